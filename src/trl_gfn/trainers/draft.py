"""DRaFT, DRaFT-K, DRaFT-LV (Clark et al., ICLR 2024) and AlignProp (Prabhudesai et al., 2023): back-propagate a
differentiable reward through the last sampling steps.

Per micro-batch: sample x_K → x_0 with the current policy; steps before the first differentiated step run
without gradient (plain UNet), the last ones with gradient through the prepared model; decode x_0 and
maximise r. With ``gradient_checkpointing`` (default on) the UNet recomputes its activations in the
backward pass, so memory grows slowly with the number of differentiated steps.

DRaFT-LV: sample x_0 without gradient, draw n copies x_1^i ~ q(x_1 | x_0) = N(sqrt(ᾱ_1/ᾱ_0) x_0, (1 − ᾱ_1/ᾱ_0) I),
take the last sampling step from each with gradient and average their rewards.
Cost per sample: (K − k) no-grad UNet calls + k UNet forwards and backwards (+ a recompute with
checkpointing) + VAE decode and reward forward/backward; DRaFT-LV: K no-grad calls + n forwards/backwards.
"""

from __future__ import annotations

import torch

from ..configs.draft import AlignPropConfig, DRaFTConfig
from .base import sample_seed
from .reward_backprop import GradSamples, RewardBackpropTrainer

DRAFT_CITATION = """@inproceedings{clark2024directly,
  title     = {Directly Fine-Tuning Diffusion Models on Differentiable Rewards},
  author    = {Kevin Clark and Paul Vicol and Kevin Swersky and David J. Fleet},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2309.17400}
}"""

ALIGNPROP_CITATION = """@article{prabhudesai2023aligning,
  title   = {Aligning Text-to-Image Diffusion Models with Reward Backpropagation},
  author  = {Mihir Prabhudesai and Anirudh Goyal and Deepak Pathak and Katerina Fragkiadaki},
  journal = {arXiv preprint arXiv:2310.03739},
  year    = {2023}
}"""


class DRaFTTrainer(RewardBackpropTrainer):
    """Fine-tune a diffusion model's LoRA by back-propagating a differentiable reward (DRaFT / DRaFT-K / DRaFT-LV).

    Usage::

        trainer = DRaFTTrainer(DRaFTConfig(draft_k=1), reward_fn, pipeline)   # DRaFT-1
        trainer = DRaFTTrainer(DRaFTConfig(draft_lv_copies=2), reward_fn, pipeline)   # DRaFT-LV
        trainer = DRaFTTrainer(DRaFTConfig(draft_k=0), reward_fn, pipeline)   # full DRaFT
        trainer.train()
    """

    config_class = DRaFTConfig
    method_name = "DRaFT"
    method_tag = "draft"
    paper = "Clark et al., *Directly Fine-Tuning Diffusion Models on Differentiable Rewards*, ICLR 2024, arXiv:2309.17400"
    citation = DRAFT_CITATION
    card_fields = [*RewardBackpropTrainer.card_fields, "draft_k", "draft_lv_copies", "truncated_backprop_rand", "truncated_rand_backprop_minmax",
                   "gradient_checkpointing"]
    log_keys = ("backprop_steps",)

    def __init__(self, config: DRaFTConfig, reward_function, pipeline=None, prompt_function=None, image_samples_hook=None, **kwargs):
        super().__init__(config, reward_function, pipeline, prompt_function=prompt_function, image_samples_hook=image_samples_hook, **kwargs)
        if type(self) is DRaFTTrainer:
            c = self.config
            if c.truncated_backprop_rand:
                self.method_name = "DRaFT with randomised truncation (AlignProp-style)"
            elif c.draft_lv_copies:
                self.method_name = f"DRaFT-LV (n={c.draft_lv_copies})"
            elif c.num_backprop_steps == c.sample_num_steps:
                self.method_name = "DRaFT (full backpropagation)"
            else:
                self.method_name = f"DRaFT-K (K={c.num_backprop_steps})"

    def first_grad_step(self, ids: list[int], epoch: int) -> int:
        """Index (sampling order) of the first differentiated step for a micro-batch."""
        c = self.config
        K = self.schedule.num_steps
        if c.truncated_backprop_rand:
            lo, hi = c.rand_backprop_minmax
            gen = torch.Generator().manual_seed(sample_seed(c.seed, epoch, ids[0], 31))
            return int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return K - c.num_backprop_steps

    def generate_with_grad(self, prompts: list[str], metadata: list[dict], ids: list[int], epoch: int) -> GradSamples:
        c, sched = self.config, self.schedule
        K = sched.num_steps
        generators = self.sample_generators(epoch, ids)
        embeds, negative = self.encode(prompts)
        latents = self.initial_latents(generators)
        if c.draft_lv_copies:
            n = c.draft_lv_copies
            x1 = self.denoise(latents, 0, K - 1, embeds, negative, generators, grad_from=K)
            x0 = self.denoise(x1, K - 1, K, embeds, negative, generators, grad_from=K)
            # q(x_1 | x_0) of the forward process between the two states (x = signal·x_0 + noise·ε): mean (signal_1/signal_0)·x_0,
            # variance noise_1² − (signal_1/signal_0)²·noise_0² (VP: sqrt(ᾱ_1/ᾱ_0), 1 − ᾱ_1/ᾱ_0; flow, x_0 clean: 1 − σ_1, σ_1²)
            scale = (sched.signal[K - 1] / sched.signal[K]).to(x0.dtype)
            spread = (sched.noise[K - 1] ** 2 - scale.double() ** 2 * sched.noise[K] ** 2).clamp(min=0).sqrt().to(x0.dtype)
            noise = torch.cat([self.pipeline._randn(x0.shape, generators, x0.device) for _ in range(n)])
            copies = scale * x0.repeat(n, 1, 1, 1) + spread * noise
            final = self.denoise(copies, K - 1, K, embeds.repeat(n, 1, 1), negative.repeat(n, 1, 1), list(generators) * n, grad_from=K - 1)
            prompts, metadata = list(prompts) * n, list(metadata) * n
            steps = 1
        else:
            start = self.first_grad_step(ids, epoch)
            final = self.denoise(latents, 0, K, embeds, negative, generators, grad_from=start)
            steps = K - start
        images = self.pipeline.decode(final)
        return GradSamples(images=images, prompts=prompts, prompt_metadata=metadata, latents=final.detach(), prompt_embeds=embeds,
                           negative_prompt_embeds=negative, logs={"backprop_steps": float(steps)})


class AlignPropTrainer(DRaFTTrainer):
    """AlignProp: reward backpropagation with randomised truncation (TRL's former ``AlignPropTrainer`` behaviour).

    A :class:`DRaFTTrainer` with an :class:`~trl_gfn.AlignPropConfig` (TRL's field names): per micro-batch
    the first differentiated step t is drawn from ``truncated_rand_backprop_minmax`` (or fixed at
    ``truncated_backprop_timestep``), and steps t..K-1 get gradient.
    """

    config_class = AlignPropConfig
    method_name = "AlignProp"
    method_tag = "alignprop"
    paper = "Prabhudesai et al., *Aligning Text-to-Image Diffusion Models with Reward Backpropagation*, arXiv:2310.03739"
    citation = ALIGNPROP_CITATION
    card_fields = [*RewardBackpropTrainer.card_fields, "truncated_backprop_rand", "truncated_backprop_timestep", "truncated_rand_backprop_minmax",
                   "gradient_checkpointing"]


__all__ = ["AlignPropTrainer", "DRaFTTrainer"]
