"""Fine-tune a Stable Diffusion LoRA with Nabla-GFlowNet (residual ∇-DB).

    accelerate launch examples/nabla_gfn.py          # bundled digits model, a few minutes on a CPU (below)
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/nabla_gfn.py \
        --config examples/configs/nabla_gfn_sd15_aesthetic.yaml

Without flags it trains on the bundled digits model with the classifier reward r = log p(digit in {0, 8}) (about
a fifth of the base model's samples are zeros or eights, so there is something to learn), with the settings of
examples/configs/nabla_gfn_digits.yaml (50 epochs of 32 samples x 10 steps, 200 updates: the shipped default for this
model, docs/benchmark.md); any flag or `--config` overrides them.
Every `NablaGFlowNetConfig` field is a flag (`--help` lists them) and can come from a YAML file given with
`--config`. `--reward aesthetic|hpsv2|hpsv2.1|imagereward|pickscore` converts the reward's official checkpoint on
first use and fills `reward_scale`, `unet_reg_scale` and `flow_condition_on_prompt` from its preset (DESIGN §2)
unless set.
"""

from pathlib import Path

from trl_gfn import NablaGFlowNetConfig, NablaGFlowNetTrainer
from trl_gfn.cli import run

DIGITS_CONFIG = Path(__file__).resolve().parent / "configs" / "nabla_gfn_digits.yaml"

if __name__ == "__main__":
    run(NablaGFlowNetTrainer, NablaGFlowNetConfig, bundled_defaults=DIGITS_CONFIG)
