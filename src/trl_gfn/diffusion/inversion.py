"""Deterministic inversion and regeneration over a linear sampler: pure tensor maths around a prediction function.

Two deterministic samplers share one form. With the coefficients of a deterministic :class:`TransitionSchedule`
(``coef_x``, ``coef_eps`` of each sampling step, in sampling order ``i = 0 .. N-1``, ``std`` = 0) a sampling step from
the state at timestep τ_i is

    x_next = coef_x[i] · x + coef_eps[i] · pred(x, τ_i),

with ``pred`` the sampler's prediction: the noise ε̂ for DDIM (η = 0) on a variance-preserving model (:func:`ddim_schedule`),
the velocity v̂ for the Euler step of a flow-matching model's ODE, x_next = x + (σ_next − σ)·v̂ (coef_x = 1,
coef_eps = σ_next − σ; :func:`deterministic_schedule` picks the one that fits the model's scheduler).

Inversion runs the chain backwards from a clean latent x_0: it solves the same step for its *start* state, with the
prediction taken at the known end state (the usual inversion approximation pred(x_i, τ_i) ≈ pred(x_{i+1}, τ_i)):

    x = (x_next − coef_eps[i] · p_inv) / coef_x[i],        p_inv = pred(x_next, τ_i).

The sampling step from the inverted state with the prediction p_inv therefore lands *exactly* on x_next: p_inv is the
target that reproduces the inverted trajectory under the sampler (ε* for DDIM, v_inv for the flow ODE). The inversion is
approximate only through pred(x, τ_i) ≠ p_inv, a first-order difference in the step size (tested: inversion followed by
regeneration with the same model reconstructs the latent, the error falling with N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .noise_level import NoiseLevel
from .schedule import TransitionSchedule, make_scheduler, transition_schedule

#: ``pred_fn(x, timesteps)``: the sampler's prediction (ε̂ or the velocity) at states x (B, C, h, w) and timesteps (B,)
PredictionFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_schedule(base_scheduler, num_steps: int, device: torch.device | str = "cpu") -> TransitionSchedule:
    """The deterministic (η = 0) DDIM :class:`TransitionSchedule` of ``num_steps`` steps on ``base_scheduler``'s noise schedule."""
    from diffusers import DDIMScheduler

    if int(num_steps) < 1:
        raise ValueError(f"num_steps: DDIM inversion needs at least 1 step, got {num_steps}")
    config = dict(base_scheduler.config)
    if config.get("thresholding", False):
        raise ValueError("schedulers with thresholding=True are not supported: the DDIM step would not be linear in the model output")
    return transition_schedule(DDIMScheduler.from_config(config, clip_sample=False), int(num_steps), eta=0.0, device=device)


def deterministic_schedule(base_scheduler, num_steps: int, device: torch.device | str = "cpu") -> TransitionSchedule:
    """The deterministic sampler of ``num_steps`` steps that fits ``base_scheduler``'s model: the flow ODE's Euler steps on a
    ``FlowMatchEulerDiscreteScheduler``'s sigmas (prediction: the velocity, ``prediction_type="flow"``), else DDIM with η = 0
    (:func:`ddim_schedule`). Raises ``ValueError`` for ``num_steps < 1`` or scheduler options the step does not model."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(base_scheduler, FlowMatchEulerDiscreteScheduler):
        return ddim_schedule(base_scheduler, num_steps, device)
    if int(num_steps) < 1:
        raise ValueError(f"num_steps: the flow ODE inversion needs at least 1 step, got {num_steps}")
    return transition_schedule(make_scheduler(base_scheduler, "flow_sde"), int(num_steps), device=device, noise_level=0.0)


@dataclass
class InvertedTrajectory:
    """An inverted trajectory, indexed in sampling order ``i = 0 .. N-1`` (``i = 0`` the noisiest state).

    Attributes:
        states: (B, N, C, h, w) the state x at which sampling step i starts (timestep ``schedule.timesteps[i]``).
        targets: (B, N, C, h, w) the prediction of step i (ε* for DDIM, v_inv for the flow ODE) that takes ``states[:, i]``
            exactly to the next state.
        clean: (B, C, h, w) the inverted clean latent x_0.
    """

    states: torch.Tensor
    targets: torch.Tensor
    clean: torch.Tensor

    @property
    def noise(self) -> torch.Tensor:
        """(B, C, h, w) the inverted noise x_T (start of sampling)."""
        return self.states[:, 0]


def _check_deterministic(schedule: TransitionSchedule) -> None:
    if not schedule.deterministic:
        raise ValueError("inversion needs a deterministic schedule (DDIM eta = 0 or the flow ODE, std 0); build it with deterministic_schedule")


@torch.no_grad()
def ode_invert(pred_fn: PredictionFn, clean: torch.Tensor, schedule: TransitionSchedule) -> InvertedTrajectory:
    """Invert clean latents (B, C, h, w) through the deterministic ``schedule`` (``std`` must be 0): N calls of ``pred_fn``.

    ``pred_fn(x, timesteps)`` returns the sampler's prediction (B, C, h, w) at states x and per-sample timesteps (B,), e.g. a
    guided reference UNet's ε̂ or a guided transformer's velocity.
    """
    _check_deterministic(schedule)
    x = clean.float()
    states, targets = [], []
    batch = x.shape[0]
    for i in reversed(range(schedule.num_steps)):
        t = schedule.timesteps[i].to(x.device).expand(batch)
        pred = pred_fn(x, t).float()
        x = (x - float(schedule.coef_eps[i]) * pred) / float(schedule.coef_x[i])
        states.append(x)
        targets.append(pred)
    return InvertedTrajectory(states=torch.stack(states[::-1], dim=1), targets=torch.stack(targets[::-1], dim=1), clean=clean.float())


@torch.no_grad()
def ode_generate(pred_fn: PredictionFn, noise: torch.Tensor, schedule: TransitionSchedule) -> torch.Tensor:
    """Run the deterministic sampler of ``schedule`` from x_T = ``noise`` (B, C, h, w) to a clean latent; N calls of ``pred_fn``."""
    _check_deterministic(schedule)
    x = noise.float()
    for i in range(schedule.num_steps):
        t = schedule.timesteps[i].to(x.device).expand(x.shape[0])
        x = float(schedule.coef_x[i]) * x + float(schedule.coef_eps[i]) * pred_fn(x, t).float()
    return x


def trajectory_weights(schedule: TransitionSchedule) -> torch.Tensor:
    """Inversion-DPO's weight (N,), float64, of each step's squared prediction error, at the step's start state:
    :meth:`NoiseLevel.inversion_weight` — 1/(2ᾱ_τ) on DDIM's ε̂, ((1 − σ)² + σ²)/2 on a flow's velocity (docs/inversion_dpo.md)."""
    return NoiseLevel(schedule.signal[:-1], schedule.noise[:-1], schedule.parameterisation).inversion_weight()


__all__ = ["InvertedTrajectory", "PredictionFn", "ddim_schedule", "deterministic_schedule", "ode_generate", "ode_invert", "trajectory_weights"]
