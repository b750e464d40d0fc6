"""Shared loop of the trainers that back-propagate a differentiable reward through sampling (DRaFT, AlignProp, ReFL).

These trainers sample *with* gradient themselves, so the base's no-grad sampling is skipped
(:attr:`samples_needed` is False). Each epoch draws ``sample_batch_size * sample_num_batches_per_epoch``
samples per process in micro-batches of ``train_batch_size``; a method provides
:meth:`generate_with_grad` (which steps carry gradient, which images are scored) and the loss is
``−mean r(images)``, accumulated over ``train_gradient_accumulation_steps`` micro-batches per update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..diffusion import step_mean
from ..pipelines import Trajectories
from .online import DiffusionRLTrainer


@dataclass
class GradSamples:
    """What :meth:`RewardBackpropTrainer.generate_with_grad` returns for one micro-batch.

    ``images`` carry the graph back to the LoRA parameters; ``prompts``/``prompt_metadata`` are aligned with
    them (repeated for DRaFT-LV copies); ``latents`` are the (detached) final latents of the scored images;
    ``logs`` holds method diagnostics (floats) averaged into the update's log.
    """

    images: torch.Tensor
    prompts: list[str]
    prompt_metadata: list[dict]
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class RewardBackpropTrainer(DiffusionRLTrainer):
    """Base of the direct reward-gradient trainers; subclasses implement :meth:`generate_with_grad`."""

    needs_reward_gradient = True
    #: keys of :attr:`GradSamples.logs`, always logged (fixed set per method)
    log_keys: tuple[str, ...] = ()

    @property
    def samples_needed(self) -> bool:
        return False

    # ------------------------------------------------------------------ sampling with gradient
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.pipeline.encode_prompts(prompts)
        negative = self.pipeline.encode_negative_prompt(self.config.negative_prompts, len(prompts))
        return embeds, negative

    def initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        """x_K, drawn exactly as :meth:`DiffusionPipelineForRL.sample` draws it (same generators, same sample)."""
        return self.pipeline.initial_latents(len(generators), generators, self.accelerator.device)

    def denoise(self, latents: torch.Tensor, start: int, stop: int, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                generators: list[torch.Generator], *, grad_from: int) -> torch.Tensor:
        """Run sampling steps ``start .. stop-1`` (sampling order) from ``latents``.

        Steps ``i >= grad_from`` call the UNet through the prepared model with gradient; earlier steps run
        without gradient on the plain UNet. The noise comes from ``generators`` in the order
        :meth:`DiffusionPipelineForRL.sample` uses, so the path equals the no-grad sampler's.
        """
        c, sched = self.config, self.schedule
        batch = latents.shape[0]
        for i in range(start, stop):
            index = torch.full((batch,), i, device=latents.device, dtype=torch.long)
            with_grad = i >= grad_from
            unet = self.wrapped("unet") if with_grad else self.pipeline.denoiser
            with torch.set_grad_enabled(with_grad):
                eps = self.pipeline.guided_epsilon(unet, latents, sched.timesteps[index], prompt_embeds, negative_embeds, c.sample_guidance_scale,
                                                   sched.level(index, like=latents), sched.prediction_type)
                mean = step_mean(latents, eps, sched.gather("coef_x", index, like=latents), sched.gather("coef_eps", index, like=latents))
                noise = self.pipeline._randn(latents.shape, generators, latents.device)
                latents = mean + sched.gather("std", index, like=latents) * noise
        return latents

    def generate_with_grad(self, prompts: list[str], metadata: list[dict], ids: list[int], epoch: int) -> GradSamples:
        """Sample one micro-batch, keeping the graph the method differentiates (see the subclasses)."""
        raise NotImplementedError

    def image_hook_data(self, samples: Trajectories) -> dict[str, Any]:
        """As TRL's AlignPropTrainer passed it: ``{"images", "prompts", "prompt_metadata", "rewards"}`` of the epoch's last
        micro-batch (DRaFT-LV: with its re-noised copies)."""
        return self.last_micro_batch

    # ------------------------------------------------------------------ the loop
    def train_on_samples(self, samples: Trajectories | None, epoch: int, global_step: int) -> int:
        c, acc = self.config, self.accelerator
        micro_batches = c.sample_batch_size * c.sample_num_batches_per_epoch // c.train_batch_size
        epoch_rewards = []
        last = None
        self.start_updates()
        bar = tqdm(range(micro_batches), desc=f"Epoch {epoch}: training", disable=self.hide_progress, leave=False)
        for m in bar:
            ids = self.batch_sample_ids(m, c.train_batch_size)
            prompts, metadata = self.prompt_source(ids, epoch)
            self.note_prompts(prompts)

            def micro_batch():
                nonlocal last
                out = self.generate_with_grad(list(prompts), list(metadata), ids, epoch)
                # a randomised truncation may draw t = K (TRL's default range reaches it): that micro-batch has no gradient,
                # and its loss none either (train_micro_batch then does not back-propagate it)
                rewards, _ = self.compute_rewards(out.images, out.prompts, out.prompt_metadata, need_grad=out.images.requires_grad)
                loss = -rewards.mean()
                terms = {"loss": loss.detach(), "reward_batch_mean": rewards.detach().mean(), **{k: out.logs[k] for k in self.log_keys}}
                epoch_rewards.append(rewards.detach())
                last = (out, rewards.detach())
                return loss, terms

            global_step = self.train_micro_batch(micro_batch, epoch, global_step)
        rewards = acc.gather(torch.cat(epoch_rewards))
        self.log({"reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(), "epoch": epoch}, step=global_step)
        if last is not None and c.log_image_freq and epoch % c.log_image_freq == 0:
            out, rewards = last
            self.last_micro_batch = {"images": out.images.detach(), "prompts": list(out.prompts), "prompt_metadata": list(out.prompt_metadata),
                                     "rewards": rewards}
            b = len(out.prompt_embeds)
            x0 = out.latents[:b]
            self.log_images(Trajectories(latents=x0[:, None], epsilons=x0.new_zeros((b, 0, *x0.shape[1:])), prompt_embeds=out.prompt_embeds,
                                         negative_prompt_embeds=out.negative_prompt_embeds, prompts=out.prompts[:b],
                                         prompt_metadata=out.prompt_metadata[:b], images=out.images[:b].detach(), rewards=rewards[:b]),
                            global_step, epoch)
        return global_step


__all__ = ["GradSamples", "RewardBackpropTrainer"]
