"""Fine-tune a Stable Diffusion LoRA with DRaFT-K, DRaFT-LV or full DRaFT (reward backpropagation).

    accelerate launch examples/draft.py --num_epochs 1 --sample_num_steps 10 --draft_k 1            # DRaFT-1
    accelerate launch examples/draft.py --num_epochs 1 --sample_num_steps 10 --draft_lv_copies 2    # DRaFT-LV
    accelerate launch examples/draft.py --num_epochs 1 --sample_num_steps 10 --draft_k 0            # full DRaFT
    accelerate launch examples/draft.py --num_epochs 1 --truncated_backprop_rand True               # AlignProp-style

Every `DRaFTConfig` field is a flag (`--help` lists them) and can come from a YAML file given with
`--config`. Defaults run offline on a CPU: the bundled digits model and its (differentiable) classifier
reward. AlignProp with TRL's field names: examples/alignprop.py. See docs/draft.md.
"""

from trl_gfn.cli import run
from trl_gfn.configs import DRaFTConfig
from trl_gfn.trainers import DRaFTTrainer

if __name__ == "__main__":
    run(DRaFTTrainer, DRaFTConfig)
