"""Fine-tune a Stable Diffusion LoRA with AlignProp (TRL's former AlignPropTrainer, on trl-gfn's DRaFT machinery).

    accelerate launch examples/alignprop.py --num_epochs 1 --sample_num_steps 10 --truncated_rand_backprop_minmax 0 9

TRL's flags keep their names: --truncated_backprop_rand, --truncated_backprop_timestep,
--truncated_rand_backprop_minmax. Every `AlignPropConfig` field is a flag and can come from `--config`
YAML. Defaults: the bundled digits model and its classifier reward. See docs/draft.md.
"""

from trl_gfn.cli import run
from trl_gfn.configs import AlignPropConfig
from trl_gfn.trainers import AlignPropTrainer

if __name__ == "__main__":
    run(AlignPropTrainer, AlignPropConfig)
