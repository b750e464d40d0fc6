"""Deterministic DDIM (η = 0) inversion and regeneration: pure tensor maths around a noise-prediction function.

With the DDIM coefficients of :func:`ddim_schedule` (``coef_x``, ``coef_eps`` of each sampling step, in sampling order
``i = 0 .. N-1``, ``std`` = 0), a sampling step from the state at timestep τ_i is

    x_next = coef_x[i] · x + coef_eps[i] · ε̂(x, τ_i).

Inversion runs the chain backwards from a clean latent x_0: it solves the same step for its *start* state, with the noise
prediction taken at the known end state (the usual DDIM-inversion approximation ε̂(x_i, τ_i) ≈ ε̂(x_{i+1}, τ_i)):

    x = (x_next − coef_eps[i] · ε_inv) / coef_x[i],        ε_inv = ε̂(x_next, τ_i).

Because both directions share the same x̂_0 / ε decomposition, the sampling step from the inverted state with ε = ε_inv
lands *exactly* on x_next: ε_inv is the noise target that reproduces the inverted trajectory under the sampler. The
inversion is approximate only through ε̂(x, τ_i) ≠ ε_inv, a first-order difference in the step size (tested:
inversion followed by η = 0 regeneration with the same model reconstructs the latent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .schedule import TransitionSchedule, transition_schedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_schedule(base_scheduler, num_steps: int, device: torch.device | str = "cpu") -> TransitionSchedule:
    """The deterministic (η = 0) DDIM :class:`TransitionSchedule` of ``num_steps`` steps on ``base_scheduler``'s noise schedule."""
    from diffusers import DDIMScheduler

    if int(num_steps) < 1:
        raise ValueError(f"num_steps: DDIM inversion needs at least 1 step, got {num_steps}")
    config = dict(base_scheduler.config)
    if config.get("thresholding", False):
        raise ValueError("schedulers with thresholding=True are not supported: the DDIM step would not be linear in the model output")
    return transition_schedule(DDIMScheduler.from_config(config, clip_sample=False), int(num_steps), eta=0.0, device=device)


@dataclass
class InvertedTrajectory:
    """A DDIM-inverted trajectory, indexed in sampling order ``i = 0 .. N-1`` (``i = 0`` the noisiest state).

    Attributes:
        states: (B, N, C, h, w) the state x at which sampling step i starts (timestep ``schedule.timesteps[i]``).
        targets: (B, N, C, h, w) ε_inv of step i: the noise that takes ``states[:, i]`` exactly to the next state.
        clean: (B, C, h, w) the inverted clean latent x_0.
    """

    states: torch.Tensor
    targets: torch.Tensor
    clean: torch.Tensor

    @property
    def noise(self) -> torch.Tensor:
        """(B, C, h, w) the inverted noise x_T (start of sampling)."""
        return self.states[:, 0]


@torch.no_grad()
def ddim_invert(eps_fn: EpsFn, clean: torch.Tensor, schedule: TransitionSchedule) -> InvertedTrajectory:
    """Invert clean latents (B, C, h, w) through the deterministic DDIM ``schedule`` (``std`` must be 0).

    ``eps_fn(x, timesteps)`` returns the noise prediction (B, C, h, w) at states x and per-sample timesteps (B,), e.g. a
    guided reference UNet. Costs N calls of ``eps_fn``.
    """
    if schedule.std.abs().max() > 0:
        raise ValueError("ddim_invert needs a deterministic schedule (eta = 0); build it with ddim_schedule")
    x = clean.float()
    states, targets = [], []
    batch = x.shape[0]
    for i in reversed(range(schedule.num_steps)):
        t = schedule.timesteps[i].to(x.device).expand(batch)
        eps = eps_fn(x, t).float()
        x = (x - float(schedule.coef_eps[i]) * eps) / float(schedule.coef_x[i])
        states.append(x)
        targets.append(eps)
    return InvertedTrajectory(states=torch.stack(states[::-1], dim=1), targets=torch.stack(targets[::-1], dim=1), clean=clean.float())


@torch.no_grad()
def ddim_generate(eps_fn: EpsFn, noise: torch.Tensor, schedule: TransitionSchedule) -> torch.Tensor:
    """Run the deterministic DDIM sampler from x_T = ``noise`` (B, C, h, w) to a clean latent; N calls of ``eps_fn``."""
    x = noise.float()
    for i in range(schedule.num_steps):
        t = schedule.timesteps[i].to(x.device).expand(x.shape[0])
        x = float(schedule.coef_x[i]) * x + float(schedule.coef_eps[i]) * eps_fn(x, t).float()
    return x


def trajectory_weights(schedule: TransitionSchedule) -> torch.Tensor:
    """Inversion-DPO's per-step weight 1/(2ᾱ_τ) of each sampling step's start state (N,), float64."""
    return 0.5 / schedule.alphas_cumprod[:-1]


__all__ = ["InvertedTrajectory", "ddim_generate", "ddim_invert", "ddim_schedule", "trajectory_weights"]
