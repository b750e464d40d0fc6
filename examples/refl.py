"""Fine-tune a Stable Diffusion LoRA with ReFL (reward of the one-step prediction at a random late step).

    accelerate launch examples/refl.py --num_epochs 1 --sample_num_steps 10 --refl_timestep_range 0 300

Every `ReFLConfig` field is a flag (`--help` lists them) and can come from a YAML file given with
`--config`. Defaults run offline on a CPU: the bundled digits model and its (differentiable) classifier
reward. See docs/refl.md.
"""

from trl_gfn.cli import run
from trl_gfn.configs import ReFLConfig
from trl_gfn.trainers import ReFLTrainer

if __name__ == "__main__":
    run(ReFLTrainer, ReFLConfig)
