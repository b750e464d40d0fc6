#!/usr/bin/env bash
# Set up .venv if needed, then align the bundled digits model with Nabla-GFlowNet on the CPU.
# Extra args go to examples/digits_demo.py (e.g. --quick, --out DIR). Outputs land in outputs/digits_demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/python examples/digits_demo.py "$@"
