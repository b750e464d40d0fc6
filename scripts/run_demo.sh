#!/usr/bin/env bash
# Set up .venv if needed, then align the bundled digits model with Nabla-GFlowNet on the CPU.
# Extra args go to the demo (e.g. --quick). Outputs land in outputs/digits_demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/python examples/nabla_gfn.py --config examples/configs/nabla_gfn_digits.yaml --logdir outputs/digits_demo "$@"
