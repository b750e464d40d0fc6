"""Fine-tune a Stable Diffusion LoRA with Inversion-DPO: the DPO losses over DDIM-inverted trajectories of the preference pairs.

    accelerate launch examples/inversion_dpo.py                                    # bundled digits model + bundled pairs (CPU)
    accelerate launch examples/inversion_dpo.py --inversion_num_steps 10 --inversion_train_steps 2 --inversion_sign released
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/inversion_dpo.py \
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --dataset yuvalkirstain/pickapic_v2 \
        --eval_split validation_unique --inversion_num_steps 40 --train_learning_rate 1e-5 --train_batch_size 1 \
        --train_gradient_accumulation_steps 64 --num_epochs 1 --mixed_precision bf16 --gradient_checkpointing True \
        --verify_images False --save_steps 200

Every `InversionDPOConfig` field is a flag (`--help` lists them) and can come from a YAML file given with `--config`; the data
arguments are those of examples/diffusion_dpo.py. See docs/inversion_dpo.md for the sign and the cost per pair.
"""

from trl_gfn import InversionDPOConfig, InversionDPOTrainer
from trl_gfn.cli import run_preference

if __name__ == "__main__":
    run_preference(config_class=InversionDPOConfig, trainer_class=InversionDPOTrainer)
