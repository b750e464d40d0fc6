"""Regenerate the config-field tables in docs/ from the dataclasses' help texts.

    python scripts/config_docs.py          # rewrite the tables in place
    python scripts/config_docs.py --check  # exit 1 if a table is out of date (the test-suite runs this)

A table lives between `<!-- config-table: ClassName -->` and `<!-- /config-table -->` in a docs page. A config with
per-loss defaults (DiffusionDPOConfig: `DEFAULT_BETA`, `LOSS_FIELDS` in its module) also has a table of them between
`<!-- loss-table: ClassName -->` and `<!-- /loss-table -->`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys

import trl_gfn.configs as configs

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"(<!-- config-table: (\w+) -->\n)(.*?)(<!-- /config-table -->)", re.S)
LOSS_BLOCK = re.compile(r"(<!-- loss-table: (\w+) -->\n)(.*?)(<!-- /loss-table -->)", re.S)


def table(cls) -> str:
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if f.name == "exp_name":
            default = "<script name>"
        shown = json.dumps(default, default=str)
        rows.append(f"| `{f.name}` | `{shown}` | {f.metadata.get('help', '').replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def loss_table(cls) -> str:
    """One row per loss type: its default beta and the fields only it reads, with their defaults."""
    import sys as _sys

    module = _sys.modules[cls.__module__]
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)  # type: ignore[misc]
                for f in dataclasses.fields(cls)}
    rows = ["| `loss_type` | default `beta` | its own fields (defaults) |", "|---|---|---|"]
    for loss, beta in module.DEFAULT_BETA.items():
        own = ", ".join(f"`{n}` = `{json.dumps(defaults[n])}`" for n in module.LOSS_FIELDS.get(loss, ())) or "–"
        shown = "– (not read)" if loss in getattr(module, "BETA_FREE_LOSSES", ()) else f"{beta:g}"
        rows.append(f"| `{loss}` | {shown} | {own} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    text = BLOCK.sub(lambda m: m.group(1) + table(getattr(configs, m.group(2))) + m.group(4), text)
    return LOSS_BLOCK.sub(lambda m: m.group(1) + loss_table(getattr(configs, m.group(2))) + m.group(4), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            stale.append(page.name)
            if not args.check:
                page.write_text(new, encoding="utf-8")
    if args.check and stale:
        print("out of date config tables in: " + ", ".join(stale) + " (run python scripts/config_docs.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
