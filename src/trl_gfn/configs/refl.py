"""Config of the ReFL trainer (reward feedback learning, Xu et al., ImageReward, NeurIPS 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import DiffusionRLConfig, _check


@dataclass
class ReFLConfig(DiffusionRLConfig):
    """Configuration of :class:`~trl_gfn.ReFLTrainer`.

    Per micro-batch of ``train_batch_size`` samples, sampling runs without gradient down to a random late
    step whose UNet timestep τ lies in ``refl_timestep_range``; one guided UNet call with gradient there gives
    the one-step prediction x̂_0 = (x_τ − sqrt(1 − ᾱ_τ) ε̂_θ) / sqrt(ᾱ_τ), and the loss is −mean r(decode(x̂_0)).
    An epoch has ``sample_batch_size * sample_num_batches_per_epoch`` samples per process.

    On a flow-matching model (SD3) x̂_0 = x_σ − σ·v̂_θ, the timesteps of ``refl_timestep_range`` are the transformer's
    1000·σ, and ``sample_noise_level=0`` runs the steps before the stop on the deterministic Euler ODE (allowed: ReFL needs
    no transition density).
    """

    train_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the LoRA parameters."})
    vae_gradient_checkpointing: bool = field(default=True, metadata={"help": "Checkpoint the VAE decoder block by block when the reward is differentiated through it: same gradients, one more decoder forward per reward gradient. On by default here: the decoder's activations are the largest graph of a transition (docs/memory.md)."})
    refl_timestep_range: list[int] = field(default_factory=lambda: [0, 250], metadata={"help": "Inclusive range [lo, hi] of UNet timesteps τ at which sampling stops; the stopping step is drawn uniformly among the sampler's steps with τ in range. The default matches ImageReward's ReFL (the last 10 of 40 steps, τ <= ~226)."})

    field_ranges = {"refl_timestep_range": ">= 0"}
    requires_transition_density = False  # one-step prediction with gradient: the deterministic flow ODE is allowed

    def validate(self) -> None:
        super().validate()
        r = self.refl_timestep_range
        _check(len(r) == 2 and r[0] <= r[1], "refl_timestep_range", f"must be two integers 0 <= lo <= hi (UNet timesteps), got {r!r}")
