"""The training-time forward (noising) process of a model, and its denoising target: what the preference trainers use.

The preference trainers (Diffusion-DPO and its variants, SPIN, PPD) noise clean latents at a random training
timestep and compare the denoiser's output with the training target of the model's own objective:

- variance-preserving models (a ``DDPMScheduler`` / ``DDIMScheduler`` / ``EulerDiscreteScheduler`` config):
  x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε at an integer timestep t, target ε, v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x_0 or x_0 as
  the scheduler's ``prediction_type`` says;
- flow-matching models (``FlowMatchEulerDiscreteScheduler``): x_σ = (1 − σ) x_0 + σ ε with σ the scheduler's
  training sigma of index t (its ``shift`` applied, as diffusers' SD3 training scripts do), the denoiser called at
  timestep σ·N, target the velocity ε − x_0 (the rectified-flow objective).

Training indices t are drawn uniformly in [0, N) by the trainers, N = :attr:`ForwardProcess.num_train_timesteps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise_level import NoiseLevel


@dataclass
class ForwardProcess:
    """Noising x_t = signal_t·x_0 + noise_t·ε at training indices t, the denoiser's timestep, and the training target.

    Build it with :meth:`from_scheduler`.

    Attributes:
        signal, noise: (N,) float32 scales of the noised state at each training index.
        model_timesteps: (N,) the timestep the denoiser is called with at each index (t itself for UNets, σ·N for flows).
        prediction_type: the denoiser's output (``epsilon``, ``v_prediction``, ``sample`` or ``flow``), which fixes the target.
    """

    signal: torch.Tensor
    noise: torch.Tensor
    model_timesteps: torch.Tensor
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler, device: torch.device | str = "cpu") -> ForwardProcess:
        """The forward process of ``scheduler``'s training configuration; ``ValueError`` for an unsupported one."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            if scheduler.config.get("use_dynamic_shifting", False):
                raise ValueError("FlowMatchEulerDiscreteScheduler with use_dynamic_shifting=True: the training sigmas depend on the image "
                                 "resolution, which the forward process does not model")
            fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # training sigmas (set_timesteps not called)
            sigmas = fresh.sigmas.float()
            return cls(1 - sigmas, sigmas, (sigmas * fresh.config.num_train_timesteps).float(), "flow").to(device)
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"pipeline: the scheduler's prediction_type {prediction_type!r} is not supported (epsilon, v_prediction, sample)")
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise ValueError(f"unsupported scheduler {type(scheduler).__name__}: it has no alphas_cumprod (a variance-preserving schedule) "
                             "and is not a FlowMatchEulerDiscreteScheduler")
        alphas = alphas.float()
        return cls(alphas.sqrt(), (1 - alphas).sqrt(), torch.arange(len(alphas)), prediction_type).to(device)

    def to(self, device: torch.device | str) -> ForwardProcess:
        return ForwardProcess(self.signal.to(device), self.noise.to(device), self.model_timesteps.to(device), self.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        """N: training indices are drawn in [0, N)."""
        return int(self.signal.shape[0])

    def level(self, t: torch.Tensor, ndim: int = 4) -> NoiseLevel:
        """:class:`NoiseLevel` of indices ``t`` (B,), shaped (B, 1, ..., 1) for ``ndim``-dimensional states; predictions ε̂
        (UNets) or velocities (flows)."""
        shape = (-1, *([1] * (ndim - 1)))
        return NoiseLevel(self.signal[t].view(shape), self.noise[t].view(shape), "velocity" if self.prediction_type == "flow" else "epsilon")

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = signal_t·x_0 + noise_t·ε for per-sample indices ``t`` (B,)."""
        level = self.level(t, clean.ndim)
        return level.signal * clean + level.noise * noise

    def target(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's training target at x_t: ε, v, x_0 (UNets, per ``prediction_type``) or ε − x_0 (flows)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "flow":
            return noise - clean
        if self.prediction_type == "sample":
            return clean
        level = self.level(t, clean.ndim)
        return level.signal * noise - level.noise * clean
