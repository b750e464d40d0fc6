"""Config of the DDPO trainer (Black et al., ICLR 2024), with the field names and meanings of TRL's former ``DDPOConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import DiffusionRLConfig, _check, warn_ignored


@dataclass
class DDPOConfig(DiffusionRLConfig):
    """Configuration of :class:`~trl_gfn.DDPOTrainer` (PPO-clip on per-step log-probabilities).

    Every field of TRL's former ``DDPOConfig`` keeps its name, default and meaning, except
    ``mixed_precision`` (default ``"no"`` here so that it runs on CPU; TRL used ``"fp16"``),
    ``tracker_project_name`` (``"trl-gfn"``) and ``negative_prompts`` (``None`` = the empty prompt).
    DDPO trains on ``int(sample_num_steps * train_timestep_fraction)`` transitions per trajectory,
    drawn uniformly without replacement (a random permutation per trajectory, as TRL did).

    Flow-GRPO (Liu et al., 2025) is this trainer with ``sample_group_size`` = G > 1, ``group_relative_advantages``
    and, optionally, ``kl_reference_scale`` > 0; on SD3 it samples with the ``flow_sde`` sampler (docs/ddpo.md).
    """

    train_cfg: bool = field(default=True, metadata={"help": "Use classifier-free guidance (scale sample_guidance_scale) when recomputing log-probabilities during training; False uses the conditional prediction only (as in TRL, the old log-probabilities still come from the guided sampler)."})
    train_adv_clip_max: float = field(default=5.0, metadata={"help": "Clip advantages to [-train_adv_clip_max, train_adv_clip_max]."})
    train_clip_range: float = field(default=1e-4, metadata={"help": "PPO clip range ε: the ratio is clipped to [1 - ε, 1 + ε]."})
    per_prompt_stat_tracking: bool = field(default=False, metadata={"help": "Normalise rewards per prompt (mean/std of a buffer of that prompt's recent rewards) instead of over the whole epoch's batch."})
    per_prompt_stat_tracking_buffer_size: int = field(default=16, metadata={"help": "Number of recent reward values kept per prompt."})
    per_prompt_stat_tracking_min_count: int = field(default=16, metadata={"help": "Below this many buffered values for a prompt, the epoch batch's mean/std are used instead."})
    sample_group_size: int = field(default=1, metadata={"help": "Samples per prompt (GRPO's group size G): the prompt source is asked for one prompt per group of G consecutive samples of a sampling batch, and the G samples share it and its metadata (each with its own noise). 1 (default) = one prompt per sample, as TRL. sample_batch_size must be a multiple of it."})
    group_relative_advantages: bool = field(default=False, metadata={"help": "Flow-GRPO's group-relative advantages: each reward is normalised by the mean and std of the rewards of its group (the sample_group_size samples drawn for one prompt in this epoch, gathered over processes), (r - mean) / (std + 1e-4), instead of over the epoch's batch. Needs sample_group_size >= 2; excludes per_prompt_stat_tracking."})
    kl_reference_scale: float = field(default=0.0, metadata={"help": "Flow-GRPO's KL coefficient: adds kl_reference_scale · KL(π_θ(·|x_k) || π_ref(·|x_k)) per trained transition to the loss, the closed-form KL between the policy's and the reference's (adapter off) Gaussian steps, ||μ_θ − μ_ref||² / (2σ_k²) averaged over the latent's elements like the log-probabilities. 0 (default, TRL's DDPO) turns it off; > 0 costs one more guided UNet forward without gradient per trained transition."})
    async_reward_computation: bool = field(default=False, metadata={"help": "Compute rewards in a thread pool while the next batch is sampled (useful for slow, non-differentiable or remote rewards)."})
    max_workers: int = field(default=2, metadata={"help": "Threads of the reward pool when async_reward_computation=True."})

    field_ranges = {"train_adv_clip_max": "> 0", "train_clip_range": "> 0", "per_prompt_stat_tracking_buffer_size": ">= 1",
                    "per_prompt_stat_tracking_min_count": ">= 1", "max_workers": ">= 1", "sample_group_size": ">= 1",
                    "kl_reference_scale": ">= 0"}

    def validate(self) -> None:
        super().validate()
        if self.vae_gradient_checkpointing:
            warn_ignored("vae_gradient_checkpointing", "DDPO never differentiates through the VAE decoder")
        if self.per_prompt_stat_tracking:
            _check(self.per_prompt_stat_tracking_min_count <= self.per_prompt_stat_tracking_buffer_size, "per_prompt_stat_tracking_min_count",
                   f"must be <= per_prompt_stat_tracking_buffer_size ({self.per_prompt_stat_tracking_buffer_size}), "
                   f"got {self.per_prompt_stat_tracking_min_count}: the buffer could never reach it")
        _check(self.sample_batch_size % self.sample_group_size == 0, "sample_group_size",
               f"must divide sample_batch_size ({self.sample_batch_size}) so that a group never spans two batches, got {self.sample_group_size}")
        if self.group_relative_advantages:
            _check(self.sample_group_size >= 2, "group_relative_advantages",
                   f"needs sample_group_size >= 2 (a group of one sample has advantage 0), got sample_group_size={self.sample_group_size}")
            _check(not self.per_prompt_stat_tracking, "group_relative_advantages",
                   "and per_prompt_stat_tracking both set how rewards become advantages: choose one")
