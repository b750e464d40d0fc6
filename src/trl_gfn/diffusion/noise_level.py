"""Where a state sits between data and noise, for any sampler: x = signal·x_0 + noise·ε.

Variance-preserving diffusion (SD 1.x/2.x, SDXL) has signal = sqrt(ᾱ), noise = sqrt(1 − ᾱ); a flow-matching model
(SD3) has signal = 1 − σ, noise = σ. Everything the trainers read off a state's noise level goes through
:class:`NoiseLevel`, so no trainer or loss branches on the family or the sampler:

- the one-step clean prediction x̂_0 from the sampler's *prediction* (:meth:`NoiseLevel.predict_x0`);
- ∂x̂_0/∂x at a fixed prediction (:meth:`NoiseLevel.x0_jacobian`, Nabla-GFlowNet's Jacobian-free guess);
- the variance-preserving equivalent ᾱ = signal² / (signal² + noise²) (:attr:`NoiseLevel.alpha_bar`): the ᾱ of the
  rescaled state x / sqrt(signal² + noise²), equal to ᾱ itself on VP schedules;
- Inversion-DPO's weight of a step's prediction error (:meth:`NoiseLevel.inversion_weight`): 1/(2ᾱ) on ε̂, and the
  same weight moved onto the velocity, ((1 − σ)² + σ²)/2, on flows;
- Nabla-GFlowNet's flow-guess weight γ (:meth:`NoiseLevel.gamma`): signal² ("squared") or signal ("sqrt"), i.e. ᾱ or
  sqrt(ᾱ) on VP schedules and (1 − σ)² or 1 − σ on flows (docs/flow_matching.md), or the posterior-smoothing factor
  signal² / (signal² + βc·noise²) ("saturating").

The sampler's *prediction* is what its transition mean is linear in (``TransitionSchedule.coef_eps`` multiplies it):
the noise prediction ε̂ for the UNet samplers (whatever the UNet outputs is converted to ε̂), the velocity v̂ for the
flow samplers. The velocity cannot be converted to ε̂ there: at σ = 1, the first state of SD3's schedule,
ε̂ = x + (1 − σ)v̂ = x carries no information about v̂.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: the parameterisations of a sampler's prediction
PARAMETERISATIONS = ("epsilon", "velocity")


@dataclass(frozen=True)
class NoiseLevel:
    """Per-sample noise level of states x = signal·x_0 + noise·ε, with the parameterisation of the sampler's prediction.

    Attributes:
        signal, noise: tensors broadcastable to the states (per-sample values of shape (B, 1, ..., 1)).
        parameterisation: ``"epsilon"`` (the prediction is ε̂, x̂_0 = (x − noise·ε̂)/signal) or ``"velocity"`` (the
            prediction is v̂ ≈ ε − x_0, x̂_0 = (x − noise·v̂)/(signal + noise), i.e. x − σ v̂ on a flow).
    """

    signal: torch.Tensor
    noise: torch.Tensor
    parameterisation: str = "epsilon"

    def __post_init__(self):
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {self.parameterisation!r}")

    @classmethod
    def from_alpha_bar(cls, alpha_bar: torch.Tensor) -> NoiseLevel:
        """The variance-preserving level of ``alpha_bar`` (signal sqrt(ᾱ), noise sqrt(1 − ᾱ)), predictions ε̂."""
        return cls(alpha_bar.sqrt(), (1 - alpha_bar).clamp(min=0).sqrt(), "epsilon")

    @property
    def alpha_bar(self) -> torch.Tensor:
        """Variance-preserving equivalent ᾱ = signal² / (signal² + noise²) (ᾱ itself on VP schedules)."""
        return self.signal**2 / (self.signal**2 + self.noise**2)

    def __getitem__(self, rows) -> NoiseLevel:
        """The levels of the samples at ``rows`` (index along dimension 0)."""
        pick = (lambda v: v[rows.to(v.device)]) if isinstance(rows, torch.Tensor) else (lambda v: v[rows])
        return NoiseLevel(pick(self.signal), pick(self.noise), self.parameterisation)

    def predict_x0(self, sample: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """One-step clean prediction x̂_0 from the sampler's prediction (ε̂ or v̂) at ``sample``."""
        if self.parameterisation == "epsilon":
            return (sample - self.noise * prediction) / self.signal
        return (sample - self.noise * prediction) / (self.signal + self.noise)

    def x0_jacobian(self) -> torch.Tensor:
        """∂x̂_0/∂x with the prediction held fixed (a per-sample scalar times the identity)."""
        return 1 / self.signal if self.parameterisation == "epsilon" else 1 / (self.signal + self.noise)

    def inversion_weight(self) -> torch.Tensor:
        """Inversion-DPO's weight of a step's squared prediction error at this state: the DDPM weight 1/(2ᾱ) of the
        variance-preserving equivalent's ε-error, moved onto the sampler's prediction at a fixed state.

        The rescaled state x / s, s = sqrt(signal² + noise²), is a VP state with ᾱ = :attr:`alpha_bar` and the same ε. On
        ε̂ the weight is 1/(2ᾱ) = s² / (2 signal²). On a velocity v̂ ≈ ε − x_0, ε̂ = (x + signal·v̂) / (signal + noise) at
        fixed x, so ε̂ − ε* = signal/(signal + noise)·(v̂ − v*) and the weight is s² / (2 (signal + noise)²): on a flow
        ((1 − σ)² + σ²) / 2, finite on all of [0, 1] (1/2 at σ = 1, where 1/(2ᾱ) is infinite). docs/inversion_dpo.md."""
        total = self.signal**2 + self.noise**2
        if self.parameterisation == "epsilon":
            return total / (2 * self.signal**2)
        return total / (2 * (self.signal + self.noise) ** 2)

    def gamma(self, scaling: str = "squared", saturation: float = 1.0) -> torch.Tensor:
        """Nabla-GFlowNet's weight γ of the guessed flow gradient: signal² (``"squared"``), signal (``"sqrt"``) or
        signal² / (signal² + saturation·noise²) (``"saturating"``).

        ``"saturating"`` is the factor by which smoothing a log-reward of curvature c over the Gaussian posterior
        N(x̂_0, noise²/signal²) shrinks β∇r at x̂_0: ∇ log E[exp(β r)] = β∇r(x̂_0) / (1 + βc·noise²/signal²), with
        ``saturation`` = βc. At the noisy steps β·γ then tends to signal²/(c·noise²), independent of β, as the true
        soft value of a confident reward does; on VP schedules ``saturation`` = 1 gives ᾱ exactly, the ``"squared"`` γ.
        """
        if scaling not in ("squared", "sqrt", "saturating"):
            raise ValueError(f"reward_gradient_scaling must be 'squared', 'sqrt' or 'saturating', got {scaling!r}")
        if scaling == "sqrt":
            return self.signal
        s2 = self.signal**2
        if scaling == "squared":
            return s2
        if saturation < 0:
            raise ValueError(f"saturation must be >= 0, got {saturation}")
        n2 = self.noise**2
        # signal² + noise² = 1 on VP schedules: written so that saturation = 1 returns signal² to the last bit there
        total = 1.0 if self.parameterisation == "epsilon" else s2 + n2
        return s2 / (total + (saturation - 1.0) * n2)


def as_noise_level(level: NoiseLevel | torch.Tensor) -> NoiseLevel:
    """``level`` itself, or the variance-preserving :class:`NoiseLevel` of a tensor ᾱ (the older calling convention)."""
    return level if isinstance(level, NoiseLevel) else NoiseLevel.from_alpha_bar(level)
