"""Fine-tune a Stable Diffusion LoRA on preference pairs: Diffusion-DPO, IPO, hinge, DMPO, SEE-DPO or Adaptive-DPO.

    accelerate launch examples/diffusion_dpo.py                                   # bundled digits model + bundled pairs (CPU)
    accelerate launch examples/diffusion_dpo.py --loss_type dmpo --winner_preserving_mu 0.9
    accelerate launch examples/diffusion_dpo.py --loss_type adaptive --minority_fraction 0.3
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/diffusion_dpo.py \
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --dataset yuvalkirstain/pickapic_v2 \
        --eval_split validation_unique --beta 5000 --train_learning_rate 1e-4 --train_batch_size 4 \
        --train_gradient_accumulation_steps 32 --num_epochs 1 --lr_warmup_steps 100 --mixed_precision bf16 --gradient_checkpointing True \
        --verify_images False --save_steps 500   # ~1.9 M pairs: decode images as their batch loads; checkpoint inside the epoch

Every `DiffusionDPOConfig` field is a flag (`--help` lists them) and can come from a YAML file given with `--config`.
`--dataset` takes the bundled data (default), a folder of <split>.parquet files, a save_to_disk folder, a .parquet file
or a Hub dataset in the Pick-a-Pic layout (caption, jpg_0, jpg_1, label_0). See docs/preference.md.
"""

from trl_gfn.cli import run_preference

if __name__ == "__main__":
    run_preference()
