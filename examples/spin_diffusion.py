"""Fine-tune a Stable Diffusion LoRA with SPIN-Diffusion: self-play on the preferred images of a preference dataset.

    accelerate launch examples/spin_diffusion.py                                   # bundled digits model + bundled pairs (CPU)
    accelerate launch examples/spin_diffusion.py --spin_num_iterations 3 --num_epochs 3 --spin_samples_per_prompt 2
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/spin_diffusion.py \
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --dataset yuvalkirstain/pickapic_v2 \
        --eval_split validation_unique --beta 2000 --train_learning_rate 1e-5 --sample_num_steps 50 --sample_guidance_scale 7.5 \
        --spin_num_iterations 2 --spin_epochs_per_iteration 1 --num_epochs 2 --mixed_precision bf16 --gradient_checkpointing True

Every `SPINDiffusionConfig` field is a flag (`--help` lists them) and can come from a YAML file given with `--config`; the data
arguments are those of examples/diffusion_dpo.py (only the preferred image of each pair is used). See docs/spin_diffusion.md.
"""

from trl_gfn import SPINDiffusionConfig, SPINDiffusionTrainer
from trl_gfn.cli import run_preference

if __name__ == "__main__":
    run_preference(config_class=SPINDiffusionConfig, trainer_class=SPINDiffusionTrainer)
