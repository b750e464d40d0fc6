"""The end-to-end check every model family gets (tests/test_sdxl.py, tests/test_sd3.py): each trainer's reward rises on the
brightness reward, its LoRA file loads with the family's diffusers ``load_lora_weights`` and reproduces the trained
samples, and resuming from the last-but-one checkpoint ends on identical weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from trl_gfn import DiffusionPipelineForRL
from trl_gfn.diffusion import predict_x0
from trl_gfn.testing import BrightnessReward

PROMPTS = ["a cat", "a dog"]
COMMON = dict(logdir=None, run_name="run", save_freq=1, log_image_freq=0, sample_guidance_scale=3.0, lora_rank=4, sample_batch_size=4,
              sample_num_batches_per_epoch=1, train_batch_size=4)


def generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@dataclass
class FamilyHarness:
    """One family's tiny pipeline builder, image size, model seed and per-trainer settings
    ``{name: (config class, trainer class, overrides, epochs for the reward rise)}``."""

    build: Callable[..., Any]
    height: int
    width: int
    model_seed: int
    settings: dict

    def wrap(self, seed: int | None = None, **kwargs) -> DiffusionPipelineForRL:
        return DiffusionPipelineForRL(self.build(seed=self.model_seed if seed is None else seed, **kwargs), height=self.height, width=self.width)

    def make(self, tmp_path, name: str, run: str = "run", **overrides):
        """The trainer ``name`` on the tiny model; ``wrapped=False`` passes the plain diffusers pipeline for the trainer to wrap."""
        config_class, trainer_class, settings, _ = self.settings[name]
        pipeline = self.wrap() if overrides.pop("wrapped", True) else self.build(seed=self.model_seed)
        kwargs = {**COMMON, **settings, "logdir": str(tmp_path), "run_name": run, **overrides}
        return trainer_class(config_class(**kwargs), BrightnessReward(), pipeline, prompt_function=PROMPTS)

    @staticmethod
    def evaluate(trainer, n: int = 16, seed: int = 1000):
        return trainer.pipeline.sample([PROMPTS[i % 2] for i in range(n)], trainer.schedule, guidance_scale=3.0, generators=generators(n, seed))

    def x0_hat_reward(self, trainer, n: int = 16) -> torch.Tensor:
        """ReFL's objective: the brightness of the one-step prediction x̂_0 at its first allowed late state."""
        traj = self.evaluate(trainer, n)
        sched = trainer.schedule
        with torch.no_grad():
            i = trainer.refl_steps[0]
            x, index = traj.latents[:, i], torch.full((n,), i)
            level = sched.level(index, like=x)
            out = trainer.pipeline.guided_epsilon(trainer.pipeline.denoiser, x, sched.timesteps[index], traj.prompt_embeds,
                                                  traj.negative_prompt_embeds, 3.0, level, sched.prediction_type)
            return trainer.pipeline.decode(predict_x0(x, out, level)).mean(dim=(1, 2, 3))

    def reward(self, trainer, name: str) -> torch.Tensor:
        return self.x0_hat_reward(trainer) if name == "refl" else self.evaluate(trainer).images.mean(dim=(1, 2, 3))

    def check_trains_reloads_and_resumes(self, tmp_path, name: str) -> Any:
        """Train ``name`` for its epochs; assert the reward rise (> 4 standard errors), the diffusers LoRA reload and the
        exact resume. Returns the trainer."""
        epochs = self.settings[name][3]
        trainer = self.make(tmp_path, name)
        before = self.reward(trainer, name)
        trainer.train(epochs=epochs)
        after = self.reward(trainer, name)
        gain = (after - before).mean().item()
        stderr = (after - before).std().item() / len(before) ** 0.5
        assert gain > 1e-3 and gain > 4 * stderr, (name, gain, stderr)
        assert trainer.state.global_step > 0 and "reward_mean" in trainer.last_metrics

        # the LoRA file loads with the family's load_lora_weights and reproduces the trained samples
        plain = self.build(seed=self.model_seed)
        plain.load_lora_weights(trainer.output_dir)
        reloaded = DiffusionPipelineForRL(plain, height=self.height, width=self.width)
        prompts = PROMPTS * 2
        mine = trainer.pipeline.sample(prompts, trainer.schedule, guidance_scale=3.0, generators=generators(4, 7))
        theirs = reloaded.sample(prompts, trainer.schedule, guidance_scale=3.0, generators=generators(4, 7))
        torch.testing.assert_close(theirs.images, mine.images, rtol=1e-5, atol=1e-5)
        base = self.wrap().sample(prompts, trainer.schedule, guidance_scale=3.0, generators=generators(4, 7))
        assert (base.images - mine.images).abs().max() > 1e-3  # the LoRA changed the samples, so the comparison can fail

        # resume from the last-but-one checkpoint and finish: identical weights to the uninterrupted run
        checkpoint = os.path.join(trainer.run_dir, "checkpoints", f"checkpoint_{epochs - 1}")
        resumed = self.make(tmp_path, name, run="resumed", resume_from=checkpoint)
        assert resumed.first_epoch == epochs - 1
        resumed.train(epochs=epochs)
        assert resumed.state.global_step == trainer.state.global_step
        for a, b in zip(trainer.trainable_parameters(), resumed.trainable_parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        return trainer
