#!/usr/bin/env bash
# Create .venv (once) and install trl-gfn with the exact versions the tests use (requirements-ci.txt).
# torch is installed first and pinned, so no dependency can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.trl_gfn_installed
want=$(cat requirements-ci.txt setup.cfg | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -r requirements-ci.txt
  .venv/bin/python -m pip install --quiet --no-deps -e .
  .venv/bin/python -m pip check
  echo "$want" > "$stamp"
fi
