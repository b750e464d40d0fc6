"""Train a tiny run that checkpoints every epoch (the preference trainer ``dpo``: every DPO_SAVE_STEPS updates, inside the
epochs too); tests/test_crash_resume.py runs it with TRL_GFN_CRASH_AT set, so that it is killed (SIGKILL) at a named point,
then resumes it in the test process with the same :func:`make_trainer`.

Each finished training phase of an epoch of the online trainers is appended to ``<out>/progress.txt`` (what the killed run
had done).
"""

import argparse
import os

import torch

from trl_gfn import (
    DDPOConfig,
    DDPOTrainer,
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    DiffusionPipelineForRL,
    NablaGFlowNetConfig,
    NablaGFlowNetTrainer,
)
from trl_gfn.rewards import JpegCompressibilityReward
from trl_gfn.testing import BrightnessReward, brightness_preferences, tiny_stable_diffusion

EPOCHS = 3
PROMPTS = ["a cat", "a dog"]
#: the preference run: 2 epochs of 24 pairs / 4 per update = 6 updates, a checkpoint every 2 updates (5 saves, the last one final)
DPO_EPOCHS, DPO_SAVE_STEPS = 2, 2


def make_trainer(method: str, out_dir: str, resume: bool = False):
    """A tiny trainer that saves every epoch and keeps one checkpoint: 2 sampling batches and 2 updates per epoch (``dpo``:
    Adaptive-DPO, with its EMA copies, saving every DPO_SAVE_STEPS updates)."""
    if method == "dpo":
        config = DiffusionDPOConfig(num_epochs=DPO_EPOCHS, train_batch_size=4, loss_type="adaptive", lr_scheduler="cosine", lr_warmup_steps=2,
                                    save_freq=0, save_steps=DPO_SAVE_STEPS, num_checkpoint_limit=1, lora_rank=4, train_learning_rate=1e-3,
                                    logdir=os.path.join(out_dir, "logs"), run_name="run", output_dir=os.path.join(out_dir, "final"),
                                    resume_from=os.path.join(out_dir, "logs", "run") if resume else "")
        return DiffusionDPOTrainer(config, DiffusionPipelineForRL(tiny_stable_diffusion()), brightness_preferences(24))
    common = dict(num_epochs=EPOCHS, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=2, train_batch_size=2,
                  logdir=os.path.join(out_dir, "logs"), run_name="run", save_freq=1, num_checkpoint_limit=1, log_image_freq=0,
                  sample_guidance_scale=3.0, lora_rank=4, train_learning_rate=1e-2, output_dir=os.path.join(out_dir, "final"),
                  resume_from=os.path.join(out_dir, "logs", "run") if resume else "")
    if method == "nabla_gfn":
        config = NablaGFlowNetConfig(flow_block_out_channels=[8, 16], flow_attention_head_dim=4, reward_scale=1e6, unet_reg_scale=1.0,
                                     flow_learning_rate=1e-2, train_timestep_fraction=0.25, **common)
        return NablaGFlowNetTrainer(config, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)
    config = DDPOConfig(train_timestep_fraction=0.5, per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=4,
                        per_prompt_stat_tracking_min_count=2, async_reward_computation=True, train_clip_range=0.5, **common)
    return DDPOTrainer(config, JpegCompressibilityReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--method", choices=["nabla_gfn", "ddpo", "dpo"], required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = make_trainer(args.method, args.out_dir)
    if args.method == "dpo":
        trainer.train()
        return
    train_on_samples = trainer.train_on_samples

    def recording(samples, epoch, global_step):
        step = train_on_samples(samples, epoch, global_step)
        with open(os.path.join(args.out_dir, "progress.txt"), "a", encoding="utf-8") as f:
            f.write(f"{epoch}\n")
        return step

    trainer.train_on_samples = recording
    trainer.train()


if __name__ == "__main__":
    main()
