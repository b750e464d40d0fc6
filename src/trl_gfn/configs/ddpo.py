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
    """

    train_cfg: bool = field(default=True, metadata={"help": "Use classifier-free guidance (scale sample_guidance_scale) when recomputing log-probabilities during training; False uses the conditional prediction only (as in TRL, the old log-probabilities still come from the guided sampler)."})
    train_adv_clip_max: float = field(default=5.0, metadata={"help": "Clip advantages to [-train_adv_clip_max, train_adv_clip_max]."})
    train_clip_range: float = field(default=1e-4, metadata={"help": "PPO clip range ε: the ratio is clipped to [1 - ε, 1 + ε]."})
    per_prompt_stat_tracking: bool = field(default=False, metadata={"help": "Normalise rewards per prompt (mean/std of a buffer of that prompt's recent rewards) instead of over the whole epoch's batch."})
    per_prompt_stat_tracking_buffer_size: int = field(default=16, metadata={"help": "Number of recent reward values kept per prompt."})
    per_prompt_stat_tracking_min_count: int = field(default=16, metadata={"help": "Below this many buffered values for a prompt, the epoch batch's mean/std are used instead."})
    async_reward_computation: bool = field(default=False, metadata={"help": "Compute rewards in a thread pool while the next batch is sampled (useful for slow, non-differentiable or remote rewards)."})
    max_workers: int = field(default=2, metadata={"help": "Threads of the reward pool when async_reward_computation=True."})

    field_ranges = {"train_adv_clip_max": "> 0", "train_clip_range": "> 0", "per_prompt_stat_tracking_buffer_size": ">= 1",
                    "per_prompt_stat_tracking_min_count": ">= 1", "max_workers": ">= 1"}

    def validate(self) -> None:
        super().validate()
        if self.vae_gradient_checkpointing:
            warn_ignored("vae_gradient_checkpointing", "DDPO never differentiates through the VAE decoder")
        if self.per_prompt_stat_tracking:
            _check(self.per_prompt_stat_tracking_min_count <= self.per_prompt_stat_tracking_buffer_size, "per_prompt_stat_tracking_min_count",
                   f"must be <= per_prompt_stat_tracking_buffer_size ({self.per_prompt_stat_tracking_buffer_size}), "
                   f"got {self.per_prompt_stat_tracking_min_count}: the buffer could never reach it")
