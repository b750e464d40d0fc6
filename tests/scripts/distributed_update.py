"""Run a few updates of a method on a tiny pipeline and save every rank's trainable weights and applied gradients.

Launched by tests/test_distributed.py, once with `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) and
once with a single process, on the same global batch of 4 trajectories per update.
"""

import argparse
import os

import torch

from trl_gfn import DDPOConfig, DDPOTrainer, DiffusionPipelineForRL, DRaFTConfig, DRaFTTrainer, NablaGFlowNetConfig, NablaGFlowNetTrainer
from trl_gfn.testing import BrightnessReward, tiny_stable_diffusion


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--processes", type=int, required=True, help="number of processes sharing the global batch of 4")
    parser.add_argument("--method", choices=["nabla_gfn", "draft", "ddpo"], default="nabla_gfn")
    parser.add_argument("--epochs", type=int, default=1, help="one update per epoch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_process = 4 // args.processes
    common = dict(num_epochs=args.epochs, sample_num_steps=4, train_batch_size=1, logdir=os.path.join(args.out_dir, "logs"), run_name="run",
                  train_learning_rate=1e-2, save_freq=1, num_checkpoint_limit=1, log_image_freq=0, sample_guidance_scale=3.0, lora_rank=4)
    if args.method == "nabla_gfn":
        trainer_class = NablaGFlowNetTrainer
        config = NablaGFlowNetConfig(
            sample_batch_size=per_process // 2, sample_num_batches_per_epoch=2, train_gradient_accumulation_steps=per_process,
            flow_block_out_channels=[8, 16], flow_attention_head_dim=4, reward_scale=1e6, unet_reg_scale=1.0, flow_learning_rate=1e-2,
            train_timestep_fraction=0.25, **common)
    elif args.method == "ddpo":  # advantages normalised over all processes' rewards, per-prompt stats gathered from every rank
        trainer_class = DDPOTrainer
        config = DDPOConfig(sample_batch_size=per_process // 2, sample_num_batches_per_epoch=2, train_gradient_accumulation_steps=per_process,
                            train_timestep_fraction=0.5, train_clip_range=0.5, per_prompt_stat_tracking=True,
                            per_prompt_stat_tracking_buffer_size=8, per_prompt_stat_tracking_min_count=2, **common)
    else:  # DRaFT-2: several calls of the prepared UNet before one backward, with gradient checkpointing
        trainer_class = DRaFTTrainer
        config = DRaFTConfig(sample_batch_size=1, sample_num_batches_per_epoch=per_process, train_gradient_accumulation_steps=per_process,
                             draft_k=2, **common)
    trainer = trainer_class(config, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()),
                                   prompt_function=["a cat", "a dog", "a frog"])
    grads = []
    inner = trainer.optimizer.optimizer
    original_step = inner.step

    def recording_step(*args, **kwargs):  # the averaged, clipped gradient each update applies
        grads.append({f"{group['name']}.{i}": p.grad.detach().cpu().clone() for group in inner.param_groups
                      for i, p in enumerate(group["params"])})
        return original_step(*args, **kwargs)

    inner.step = recording_step
    trainer.train()
    acc = trainer.accelerator
    weights = {f"{group['name']}.{i}": p.detach().cpu().clone() for group in trainer.optimizer.param_groups for i, p in enumerate(group["params"])}
    torch.save({"weights": weights, "grads": grads, "global_step": trainer.state.global_step, "num_processes": acc.num_processes,
                "wrapped": type(trainer.model).__name__}, os.path.join(args.out_dir, f"rank{acc.process_index}.pt"))


if __name__ == "__main__":
    main()
