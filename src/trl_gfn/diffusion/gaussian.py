"""Pure tensor maths of one Gaussian sampler step: noise/clean predictions, mean, log-density, scores.

No model calls and no I/O here: the trainers pass in model outputs. All functions are batched over the
first dimension and broadcast per-sample coefficients of shape (B, 1, ..., 1).
"""

from __future__ import annotations

import math

import torch

from .noise_level import NoiseLevel, as_noise_level


def model_output_to_epsilon(model_output: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor | NoiseLevel, prediction_type: str) -> torch.Tensor:
    """Convert a denoiser output to the sampler's prediction (linear in the output, so CFG commutes with it).

    ``alpha_bar`` is the state's ᾱ (a tensor) or its :class:`~trl_gfn.diffusion.NoiseLevel`. UNet outputs
    (``epsilon``, ``v_prediction``, ``sample``) become the noise prediction ε̂; a flow model's velocity
    (``prediction_type="flow"``) is the flow samplers' prediction itself and is returned unchanged
    (see :mod:`trl_gfn.diffusion.noise_level` for why it is not turned into ε̂).
    """
    if prediction_type in ("epsilon", "flow"):
        return model_output
    level = as_noise_level(alpha_bar)
    if prediction_type == "v_prediction":
        return level.signal * model_output + level.noise * sample
    if prediction_type == "sample":
        return (sample - level.signal * model_output) / level.noise
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def predict_x0(sample: torch.Tensor, epsilon: torch.Tensor, alpha_bar: torch.Tensor | NoiseLevel) -> torch.Tensor:
    """One-step clean prediction x̂_0 from the sampler's prediction: (x − sqrt(1 − ᾱ) ε̂) / sqrt(ᾱ) for a tensor ᾱ;
    for a :class:`~trl_gfn.diffusion.NoiseLevel`, :meth:`~trl_gfn.diffusion.NoiseLevel.predict_x0` (x − σ v̂ on a flow)."""
    return as_noise_level(alpha_bar).predict_x0(sample, epsilon)


def step_mean(sample: torch.Tensor, epsilon: torch.Tensor, coef_x: torch.Tensor, coef_eps: torch.Tensor) -> torch.Tensor:
    """Mean of P_F(x_{k-1} | x_k) given the guided noise prediction at x_k."""
    return coef_x * sample + coef_eps * epsilon


def log_prob(next_sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(next_sample; mean, std² I), summed over all non-batch dimensions."""
    var = (std**2).expand_as(next_sample)
    sq = ((next_sample - mean) ** 2 / var).flatten(1).sum(1)
    log_norm = torch.log(2 * math.pi * var).flatten(1).sum(1)
    return -0.5 * (sq + log_norm)


def score_next(next_sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """∇_{x_{k-1}} log P_F(x_{k-1} | x_k) = -(x_{k-1} - μ) / σ²."""
    return -(next_sample - mean) / std**2


def score_residual(epsilon: torch.Tensor, reference_epsilon: torch.Tensor, coef_eps: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """s_θ − s_ref = (μ_θ − μ_ref)/σ² = coef_eps·(ε̂_θ − ε̂_ref)/σ² for two Gaussian steps from the same state with the same σ.

    Computed from the noise difference in float32 (autocast off), not as the difference of the two scores
    −(x' − μ)/σ²: at σ ≈ 0.02 those are ~1/σ large and cancel, which loses 1e-5–1e-4 relative in float32 and
    everything in bfloat16.
    """
    with torch.autocast(device_type=epsilon.device.type, enabled=False):
        return coef_eps.float() * (epsilon.float() - reference_epsilon.float()) / std.float() ** 2


def score_current(next_sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, sample: torch.Tensor, *, retain_graph: bool = True) -> torch.Tensor:
    """∇_{x_k} log P_F(x_{k-1} | x_k) by one vector-Jacobian product through ``mean(sample)``.

    ``mean`` must have been computed from ``sample`` (which requires grad); ``next_sample`` is held fixed.
    Only the input gradient is computed: no parameter ``.grad`` is touched.
    """
    quad = -0.5 * ((next_sample.detach() - mean) ** 2 / std**2).sum()
    (grad,) = torch.autograd.grad(quad, sample, retain_graph=retain_graph)
    return grad


def log_ratio(next_sample: torch.Tensor, mean: torch.Tensor, epsilon: torch.Tensor, reference_epsilon: torch.Tensor, coef_eps: torch.Tensor,
              std: torch.Tensor) -> torch.Tensor:
    """Per-sample log P(x' | x) − log P_ref(x' | x) of two Gaussian steps from the same state with the same σ, the first with
    mean ``mean`` (from the noise prediction ``epsilon``), the second from ``reference_epsilon``.

    With d = x' − μ and Δ = μ − μ_ref = coef_eps·(ε̂ − ε̂_ref): (‖d + Δ‖² − ‖d‖²)/(2σ²) = (2⟨d, Δ⟩ + ‖Δ‖²)/(2σ²), summed over
    the non-batch dimensions, in float32 — not the difference of two log-densities, which are ~dim·log σ large and cancel.
    """
    with torch.autocast(device_type=epsilon.device.type, enabled=False):
        d = next_sample.float() - mean.float()
        delta = coef_eps.float() * (epsilon.float() - reference_epsilon.float())
        return ((2 * d + delta) * delta / (2 * std.float() ** 2)).flatten(1).sum(1)
