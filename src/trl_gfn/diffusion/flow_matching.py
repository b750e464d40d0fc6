"""Transition maths of flow-matching (rectified-flow) samplers, as used by Stable Diffusion 3.

No model calls and no I/O here, as in :mod:`trl_gfn.diffusion.gaussian`: the trainers pass in model outputs.

Conventions (those of diffusers' :class:`~diffusers.FlowMatchEulerDiscreteScheduler`). A state at noise level
``sigma`` in [0, 1] is ``x = (1 - sigma) x_0 + sigma * eps`` with ``eps ~ N(0, I)``; sampling runs from
``sigma = 1`` (pure noise) down to ``sigma = 0`` (data). The transformer predicts the velocity
``v ≈ eps - x_0``, so that

    x̂_0 = x - sigma * v,        ε̂ = x + (1 - sigma) * v,        score ∇ log p_sigma(x) ≈ -ε̂ / sigma.

The deterministic sampler is the Euler step of the probability-flow ODE ``dx = v dsigma``::

    x_next = x + (sigma_next - sigma) * v.

The stochastic sampler is the Euler–Maruyama step of the SDE with the same marginals that Flow-GRPO derives
(Liu et al. 2025, arXiv:2505.05470). With ``dt = sigma_next - sigma < 0`` and noise scale
``g(sigma) = a * sqrt(sigma / (1 - sigma))`` (``a`` = ``noise_level``)::

    x_next = x + dt * [v + g² / (2 sigma) * (x + (1 - sigma) v)] + g * sqrt(-dt) * z,     z ~ N(0, I)

i.e. a Gaussian whose mean is linear in the current state and in the velocity::

    x_next = coef_x * x + coef_v * v + std * z,
    coef_x = 1 + dt * g² / (2 sigma),   coef_v = dt * (1 + g² (1 - sigma) / (2 sigma)),   std = g * sqrt(-dt).

Because the mean is linear in the model output with the same ``coef_v`` for any model, the helpers of
:mod:`trl_gfn.diffusion.gaussian` apply unchanged with the velocity in place of the noise prediction:
``step_mean(x, v, coef_x, coef_v)``, ``log_prob``, ``score_next``, ``score_current`` and
``score_residual(v_θ, v_ref, coef_v, std)``. ``docs/flow_matching.md`` writes out the derivation, why the
marginals match the ODE's, and how residual ∇-DB (Nabla-GFlowNet) applies to these transitions.

At ``sigma = 1`` (the first step of SD3's schedule) ``g`` is infinite; as Flow-GRPO does, the ``1 - sigma`` of
``g`` then uses ``sigma_max`` (the schedule's second sigma) instead. Any finite ``g(sigma) >= 0`` keeps the
marginals of the continuous-time SDE equal to the ODE's (the drift correction uses the same ``g``), so this
only changes how much noise the first step injects.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

__all__ = [
    "MEMORYLESS_NOISE_LEVEL",
    "FlowTransitionSchedule",
    "flow_ode_step",
    "flow_sde_coefficients",
    "flow_sde_noise_scale",
    "flow_sde_step_mean",
    "flow_transition_schedule",
    "velocity_to_epsilon",
    "velocity_to_x0",
]

#: The noise level a = sqrt(2): g² = 2σ / (1 − σ) is the diffusion coefficient of the forward noising SDE
#: dx = −x / (1 − σ) dσ + sqrt(2σ / (1 − σ)) dW, whose marginals are those of x = (1 − σ) x_0 + σ ε; the sampler at
#: this level is its time reversal (DDPM's analogue), which forgets its starting noise ("memoryless"). Flow-GRPO's
#: default 0.7 lies between the ODE (a = 0) and this.
MEMORYLESS_NOISE_LEVEL = math.sqrt(2.0)


def _check_sigma(name: str, sigma) -> None:
    """Raise ``ValueError`` naming ``name`` unless every entry of ``sigma`` lies in [0, 1]."""
    value = torch.as_tensor(sigma)
    if value.numel() == 0:
        raise ValueError(f"{name} is empty")
    bad = torch.isnan(value) | (value < 0) | (value > 1)
    if bool(bad.any()):
        raise ValueError(f"{name} must lie in [0, 1] (the flow-matching noise level), got values {value[bad].flatten()[:4].tolist()}")


def _check_noise_level(noise_level: float) -> float:
    """Return ``noise_level`` as a float; raise ``ValueError`` naming it unless it is finite and >= 0."""
    value = float(noise_level)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
    return value


def velocity_to_x0(sample: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
    """One-step clean prediction from a velocity prediction: x̂_0 = x − σ·v.

    Exact for the true velocity ``v = E[eps - x_0 | x]`` in the sense x̂_0 = E[x_0 | x]. ``sigma`` is a float or
    a tensor broadcastable to ``sample`` (per-sample values of shape (B, 1, ..., 1)); it must lie in [0, 1].
    """
    _check_sigma("sigma", sigma)
    return sample - sigma * velocity


def velocity_to_epsilon(sample: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
    """Noise prediction from a velocity prediction: ε̂ = x + (1 − σ)·v (so that x = (1 − σ) x̂_0 + σ ε̂).

    The score of the noised marginal is ∇ log p_σ(x) = −E[eps | x] / σ ≈ −ε̂ / σ. ``sigma`` as in
    :func:`velocity_to_x0`.
    """
    _check_sigma("sigma", sigma)
    return sample + (1 - sigma) * velocity


def flow_ode_step(sample: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Deterministic Euler step of the flow ODE: x_next = x + (σ_next − σ)·v.

    This is ``FlowMatchEulerDiscreteScheduler.step`` (without ``stochastic_sampling``), and the ``noise_level = 0``
    limit of the SDE step. Both sigmas must lie in [0, 1].
    """
    _check_sigma("sigma", sigma)
    _check_sigma("sigma_next", sigma_next)
    return sample + (sigma_next - sigma) * velocity


def flow_sde_noise_scale(sigma: torch.Tensor, noise_level: float, sigma_max: float | None = None) -> torch.Tensor:
    """Diffusion coefficient g(σ) = a·sqrt(σ / (1 − σ)) of the marginal-preserving flow SDE (a = ``noise_level``).

    Where σ = 1 the denominator uses ``sigma_max`` instead (Flow-GRPO uses the schedule's second sigma); without
    ``sigma_max`` a σ of 1 with ``noise_level > 0`` raises ``ValueError``. Returns float64 values shaped like ``sigma``.
    """
    noise_level = _check_noise_level(noise_level)
    _check_sigma("sigma", sigma)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if noise_level == 0:
        return torch.zeros_like(sigma)
    at_one = sigma >= 1
    if bool(at_one.any()):
        if sigma_max is None:
            raise ValueError("sigma = 1 makes the SDE's noise scale infinite: pass sigma_max < 1 (Flow-GRPO uses the schedule's second sigma)")
        if not 0 <= float(sigma_max) < 1:
            raise ValueError(f"sigma_max must lie in [0, 1), got {sigma_max!r}")
    denominator_sigma = torch.where(at_one, sigma.new_tensor(float(sigma_max or 0.0)), sigma)
    return noise_level * (sigma / (1 - denominator_sigma)).sqrt()


def flow_sde_coefficients(sigma, sigma_next, noise_level: float, sigma_max: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients ``(coef_x, coef_v, std)`` of one SDE step, x_next ~ N(coef_x·x + coef_v·v, std² I).

    With dt = σ_next − σ < 0 and g = :func:`flow_sde_noise_scale`::

        coef_x = 1 + dt·g² / (2σ),   coef_v = dt·(1 + g²(1 − σ) / (2σ)),   std = g·sqrt(−dt).

    g²/(2σ) is computed as a² / (2 (1 − σ̃)) (σ̃: σ, or ``sigma_max`` where σ = 1), so σ = 0 is not a division
    by zero. ``noise_level = 0`` gives the ODE step (1, dt, 0). Requires σ_next ≤ σ (sampling goes towards data).
    Returns float64 tensors of the broadcast shape of the inputs.
    """
    noise_level = _check_noise_level(noise_level)
    _check_sigma("sigma", sigma)
    _check_sigma("sigma_next", sigma_next)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float64)
    if bool((sigma_next > sigma).any()):
        raise ValueError("sigma_next must be <= sigma: a sampling step goes from noise (sigma = 1) towards data (sigma = 0)")
    dt = sigma_next - sigma
    g = flow_sde_noise_scale(sigma, noise_level, sigma_max)
    if noise_level == 0:
        half_g2_over_sigma = torch.zeros_like(sigma)
    else:
        denominator_sigma = torch.where(sigma >= 1, sigma.new_tensor(float(sigma_max or 0.0)), sigma)
        half_g2_over_sigma = noise_level**2 / (2 * (1 - denominator_sigma))
    coef_x = 1 + dt * half_g2_over_sigma
    coef_v = dt * (1 + half_g2_over_sigma * (1 - sigma))
    std = g * (-dt).sqrt()
    coef_x, coef_v, std = torch.broadcast_tensors(coef_x, coef_v, std)
    return coef_x, coef_v, std


def flow_sde_step_mean(sample: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next, noise_level: float, sigma_max: float | None = None) -> torch.Tensor:
    """Mean of one SDE step, coef_x·x + coef_v·v (see :func:`flow_sde_coefficients`), in the dtype of ``sample``.

    ``sigma`` / ``sigma_next`` are floats or tensors broadcastable to ``sample``.
    """
    coef_x, coef_v, _ = flow_sde_coefficients(sigma, sigma_next, noise_level, sigma_max)
    return coef_x.to(sample.device, sample.dtype) * sample + coef_v.to(sample.device, sample.dtype) * velocity


@dataclass
class FlowTransitionSchedule:
    """Coefficients of the K steps of a flow-matching sampler, indexed in sampling order ``i = 0 .. K-1``.

    Step ``i`` is x_{i+1} = coef_x[i]·x_i + coef_v[i]·v(x_i, timesteps[i]) + std[i]·z; ``std`` is all zeros for the
    ODE (``noise_level = 0``).

    Attributes:
        timesteps: (K,) float32 transformer timesteps (σ·num_train_timesteps, as diffusers passes them).
        sigmas: (K + 1,) float64 σ of every state in sampling order; the last entry (0) belongs to the sample.
        coef_x, coef_v, std: (K,) float64 mean/std coefficients of each step.
        noise_level: the SDE's ``a``.
        sigma_max: the σ used in g's denominator where σ = 1.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    coef_x: torch.Tensor
    coef_v: torch.Tensor
    std: torch.Tensor
    noise_level: float
    sigma_max: float

    @property
    def num_steps(self) -> int:
        """Number K of sampling steps."""
        return int(self.timesteps.shape[0])

    def gather(self, name: str, step_index: torch.Tensor, *, like: torch.Tensor) -> torch.Tensor:
        """Pick attribute ``name`` at per-sample positions ``step_index`` and broadcast it like ``like``."""
        values = getattr(self, name).to(step_index.device)[step_index]
        values = values.to(like.dtype) if values.is_floating_point() else values
        return values.view(-1, *([1] * (like.ndim - 1))).to(like.device)


def flow_transition_schedule(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_steps: int,
    noise_level: float = 0.7,
    device: torch.device | str = "cpu",
    mu: float | None = None,
) -> FlowTransitionSchedule:
    """The :class:`FlowTransitionSchedule` of ``scheduler`` for ``num_steps`` steps at SDE noise level ``noise_level``.

    Calls ``scheduler.set_timesteps(num_steps, mu=mu)`` (``mu`` is needed only with ``use_dynamic_shifting``), so
    the sigmas (shift, Karras/exponential/beta spacing, ``shift_terminal``) are exactly the scheduler's.
    ``noise_level = 0`` is the deterministic Euler ODE sampler; Flow-GRPO uses 0.7. ``sigma_max`` is the second
    sigma, as in Flow-GRPO.

    Raises ``ValueError`` for ``num_steps < 1``, ``noise_level < 0``, a scheduler that is not a
    ``FlowMatchEulerDiscreteScheduler``, or options that change the step (``stochastic_sampling``,
    ``invert_sigmas``).
    """
    try:
        steps = operator.index(num_steps)
    except TypeError:
        steps = None
    if isinstance(num_steps, bool) or steps is None or steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    num_steps = steps
    noise_level = _check_noise_level(noise_level)
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"scheduler must be a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
    for option in ("stochastic_sampling", "invert_sigmas"):
        if scheduler.config.get(option, False):
            raise ValueError(f"FlowMatchEulerDiscreteScheduler option {option}=True is not supported: its step is not the Euler flow step")
    scheduler.set_timesteps(num_steps, device="cpu", mu=mu)
    sigmas = scheduler.sigmas.to(torch.float64).clone()
    _check_sigma("scheduler.sigmas", sigmas)
    if num_steps > 1:
        sigma_max = float(sigmas[1])
    else:
        sigma_max = float(sigmas[0]) if float(sigmas[0]) < 1 else 0.0
    coef_x, coef_v, std = flow_sde_coefficients(sigmas[:-1], sigmas[1:], noise_level, sigma_max)
    device = torch.device(device)
    return FlowTransitionSchedule(
        timesteps=scheduler.timesteps.clone().to(device),
        sigmas=sigmas.to(device),
        coef_x=coef_x.to(device),
        coef_v=coef_v.to(device),
        std=std.to(device),
        noise_level=noise_level,
        sigma_max=sigma_max,
    )
