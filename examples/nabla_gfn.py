"""Fine-tune a Stable Diffusion LoRA with Nabla-GFlowNet (residual ∇-DB).

    accelerate launch examples/nabla_gfn.py                               # bundled digits model, CPU-sized
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/nabla_gfn.py \
        --config examples/configs/nabla_gfn_sd15_aesthetic.yaml

Every `NablaGFlowNetConfig` field is a flag (`--help` lists them) and can come from a YAML file given with
`--config`. `--reward aesthetic|hpsv2|imagereward|pickscore` loads a converted Hub reward and fills
`reward_scale`, `unet_reg_scale` and `flow_condition_on_prompt` from its preset (DESIGN §2) unless set.
"""

from trl_gfn import NablaGFlowNetConfig, NablaGFlowNetTrainer
from trl_gfn.cli import run

if __name__ == "__main__":
    run(NablaGFlowNetTrainer, NablaGFlowNetConfig)
