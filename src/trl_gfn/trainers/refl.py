"""ReFL: reward feedback learning (Xu et al., *ImageReward*, NeurIPS 2023).

Per micro-batch: sample without gradient down to a random late step i whose UNet timestep τ_i lies in
``refl_timestep_range``; one guided UNet call with gradient at x_i gives the one-step prediction
x̂_0 = (x_i − sqrt(1 − ᾱ_i) ε̂_θ(x_i)) / sqrt(ᾱ_i); maximise r(decode(x̂_0)). The stopping step is drawn
once per micro-batch (as in ImageReward's code). ImageReward also mixed in the pre-training loss and
used a ReLU-shaped reward transform; this trainer maximises the log-reward itself, like the others.
Cost per sample: i no-grad UNet calls + one UNet forward and backward + VAE decode and reward forward/backward.
"""

from __future__ import annotations

import torch

from ..configs.refl import ReFLConfig
from ..diffusion import predict_x0
from .base import sample_seed
from .reward_backprop import GradSamples, RewardBackpropTrainer

CITATION = """@inproceedings{xu2023imagereward,
  title     = {ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation},
  author    = {Jiazheng Xu and Xiao Liu and Yuchen Wu and Yuxuan Tong and Qinkai Li and Ming Ding and Jie Tang and Yuxiao Dong},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2023},
  eprint    = {2304.05977}
}"""


class ReFLTrainer(RewardBackpropTrainer):
    """Fine-tune a diffusion model's LoRA with ReFL (maximise the reward of the one-step x̂_0 at a random late step).

    Usage::

        trainer = ReFLTrainer(ReFLConfig(refl_timestep_range=[0, 250]), reward_fn, pipeline)
        trainer.train()

    The logged ``reward_mean`` is that of the decoded x̂_0 the loss uses, not of fully sampled images.
    """

    config_class = ReFLConfig
    method_name = "ReFL"
    method_tag = "refl"
    paper = "Xu et al., *ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation*, NeurIPS 2023, arXiv:2304.05977"
    citation = CITATION
    card_fields = [*RewardBackpropTrainer.card_fields, "refl_timestep_range"]
    log_keys = ("refl_step", "refl_timestep")

    def __init__(self, config: ReFLConfig, reward_function, pipeline=None, prompt_function=None, image_samples_hook=None, **kwargs):
        super().__init__(config, reward_function, pipeline, prompt_function=prompt_function, image_samples_hook=image_samples_hook, **kwargs)
        lo, hi = config.refl_timestep_range
        self.refl_steps = [i for i, t in enumerate(self.schedule.timesteps.tolist()) if lo <= t <= hi]
        if not self.refl_steps:
            raise ValueError(f"refl_timestep_range: no step of the {config.sample_num_steps}-step sampler has a UNet timestep in "
                             f"[{lo}, {hi}]; its timesteps are {self.schedule.timesteps.tolist()}")

    def stop_step(self, ids: list[int], epoch: int) -> int:
        """The step index (sampling order) at which a micro-batch stops and predicts x̂_0."""
        gen = torch.Generator().manual_seed(sample_seed(self.config.seed, epoch, ids[0], 37))
        return self.refl_steps[int(torch.randint(len(self.refl_steps), (1,), generator=gen))]

    def generate_with_grad(self, prompts: list[str], metadata: list[dict], ids: list[int], epoch: int) -> GradSamples:
        c, sched = self.config, self.schedule
        generators = self.sample_generators(epoch, ids)
        embeds, negative = self.encode(prompts)
        latents = self.initial_latents(generators)
        i = self.stop_step(ids, epoch)
        x = self.denoise(latents, 0, i, embeds, negative, generators, grad_from=sched.num_steps)  # no gradient
        index = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        alpha_bar = sched.level(index, like=x)
        eps = self.pipeline.guided_epsilon(self.wrapped("unet"), x, sched.timesteps[index], embeds, negative, c.sample_guidance_scale, alpha_bar,
                                           sched.prediction_type)
        x0 = predict_x0(x, eps, alpha_bar)
        images = self.pipeline.decode(x0)
        return GradSamples(images=images, prompts=list(prompts), prompt_metadata=list(metadata), latents=x0.detach(), prompt_embeds=embeds,
                           negative_prompt_embeds=negative, logs={"refl_step": float(i), "refl_timestep": float(sched.timesteps[i])})


__all__ = ["ReFLTrainer"]
