"""Fine-tune a Stable Diffusion LoRA with DDPO (PPO-clip; TRL's former DDPOTrainer behaviour).

    accelerate launch examples/ddpo.py --num_epochs 1 --sample_num_steps 10 --sample_batch_size 4 \
        --train_batch_size 2 --reward jpeg_compressibility
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/ddpo.py \
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --reward jpeg_compressibility --per_prompt_stat_tracking True

Every `DDPOConfig` field (TRL's former DDPOConfig names) is a flag (`--help` lists them) and can come from a
YAML file given with `--config`. Defaults run offline on a CPU: the bundled digits model and its classifier
reward; DDPO also takes non-differentiable rewards such as `--reward jpeg_compressibility`. See docs/ddpo.md.
"""

from trl_gfn.cli import run
from trl_gfn.configs import DDPOConfig
from trl_gfn.trainers import DDPOTrainer

if __name__ == "__main__":
    run(DDPOTrainer, DDPOConfig)
