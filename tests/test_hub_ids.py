"""No Hub id known to be dead appears anywhere in the repository (code, docs, examples, configs, tests)."""

from __future__ import annotations

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Hub ids that do not exist, and what to use instead. This file is the only place that may name them.
DEAD_IDS = {
    "runwayml/stable-diffusion-v1-5": "deleted from the Hub in 2024; use stable-diffusion-v1-5/stable-diffusion-v1-5",
    "runwayml/stable-diffusion-inpainting": "deleted from the Hub in 2024",
    "trl-gfn/aesthetic-v2-clip-l14": "never published; load_reward('aesthetic') converts the official checkpoint",
    "trl-gfn/hpsv2.1-clip-h14": "never published; load_reward('hpsv2.1') converts the official checkpoint",
    "trl-gfn/imagereward-v1.0": "never published; load_reward('imagereward') converts the official checkpoint",
    "trl-gfn/pickscore-v1-clip-h14": "never published; load_reward('pickscore') converts the official checkpoint",
}


def repository_files() -> list[str]:
    """Tracked and untracked (not ignored) files; a plain walk when this is not a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
        return [f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", "logs", "outputs", "wandb"}
        files = []
        for root, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip]
            files += [os.path.relpath(os.path.join(root, n), ROOT) for n in names]
        return files


def test_no_dead_hub_id_in_the_repository():
    pattern = re.compile("|".join(re.escape(i) for i in DEAD_IDS))
    me = os.path.relpath(os.path.abspath(__file__), ROOT)
    hits = []
    files = repository_files()
    assert any(f.endswith("README.md") for f in files) and any(f.startswith("docs/") for f in files)  # the scan sees the docs
    for rel in files:
        if rel == me:
            continue
        try:
            text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue  # binary (weights, images)
        for n, line in enumerate(text.splitlines(), 1):
            for m in pattern.finditer(line):
                hits.append(f"{rel}:{n}: {m.group(0)} ({DEAD_IDS[m.group(0)]})")
    assert not hits, "dead Hub ids:\n" + "\n".join(hits)
