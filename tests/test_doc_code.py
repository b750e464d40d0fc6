"""Every Python block of README.md and docs/*.md runs, unless it says it needs the Hub.

Convention: a fenced block tagged ``python`` runs on the bundled model, offline, in a fresh namespace and an empty
working directory. A block whose first line is ``# needs: hub`` (it downloads models or needs a GPU) is compiled and
its import statements are executed, nothing else. Other fences (``bash``, ``yaml``, ``text``) are not run.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_MARK = "# needs: hub"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
#: pages whose blocks are being reworked elsewhere: their unmarked blocks are compiled and their imports run, not the rest.
#: An entry that no longer has an unmarked block fails the test below, so that it is removed once the page is done.
PENDING: dict[str, str] = {}  # page -> why its blocks are only import-checked for now


def doc_pages() -> list[str]:
    docs = sorted(f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))
    return ["README.md", *docs]


def blocks() -> list[tuple[str, str, bool]]:
    """``(page:line, code, needs_hub)`` for every python block."""
    out = []
    for page in doc_pages():
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            text = f.read()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            code = m.group(1)
            out.append((f"{page}:{line}", code, code.lstrip().startswith(HUB_MARK)))
    return out


BLOCKS = blocks()
RUNNABLE = [(where, code) for where, code, hub in BLOCKS if not hub and where.split(":")[0] not in PENDING]
CHECKED_ONLY = [(where, code) for where, code, hub in BLOCKS if hub or where.split(":")[0] in PENDING]


def run_imports(code: str, where: str) -> None:
    tree = ast.parse(code, filename=where)
    imports = ast.Module(body=[node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))], type_ignores=[])
    exec(compile(imports, where, "exec"), {"__name__": "__doc_block__"})


@pytest.mark.parametrize("where,code", RUNNABLE, ids=[w for w, _ in RUNNABLE])
def test_runnable_doc_block(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that train write logs/ here
    exec(compile(code, where, "exec"), {"__name__": "__doc_block__"})


@pytest.mark.parametrize("where,code", CHECKED_ONLY, ids=[w for w, _ in CHECKED_ONLY])
def test_hub_doc_block_compiles_and_its_imports_exist(where, code):
    run_imports(code, where)


def test_the_convention_holds():
    pages = {where.split(":")[0] for where, _, _ in BLOCKS}
    assert {"README.md", "docs/quickstart.md", "docs/bundled_model.md", "docs/evaluation.md"} <= pages
    assert len(RUNNABLE) >= 6  # the runnable examples stay runnable, not all turned into Hub blocks
    for page in PENDING:
        assert any(w.startswith(page + ":") and not hub for w, _, hub in BLOCKS), (
            f"{page} has no unmarked python block any more: remove it from PENDING so that its blocks are run")
