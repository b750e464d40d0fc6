"""Config of Inversion-DPO: Diffusion-DPO over deterministically inverted trajectories (DDIM; the Euler ODE on SD3) (Li et al., ACM MM 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import _check
from .dpo import DiffusionDPOConfig

#: default β of Inversion-DPO (its error is a trajectory mean weighted by 1/(2ᾱ), larger than Diffusion-DPO's; not tuned)
INVERSION_DEFAULT_BETA = 50.0


@dataclass
class InversionDPOConfig(DiffusionDPOConfig):
    """Configuration of :class:`~trl_gfn.InversionDPOTrainer`: the preference losses of :class:`DiffusionDPOConfig` on inverted
    trajectories (DDIM on the UNet families, the flow ODE's Euler steps on SD3) instead of randomly noised latents.

    Every :class:`DiffusionDPOConfig` field keeps its meaning (``loss_type`` picks the loss on the logit u; the logit is built
    from the trajectory errors). The inversion runs through the reference (adapter off) with ``inversion_num_steps`` deterministic
    steps and classifier-free guidance ``inversion_guidance_scale``; each update trains on ``inversion_train_steps`` of the
    trajectory's steps per pair (all of them by default, the paper's objective). ``random_flip`` must stay off and the
    images are encoded with the VAE posterior mean, so that a pair's inversion is fixed for the run and cached.
    """

    beta: float | None = field(default=None, metadata={"help": f"KL weight beta of the implicit reward (see DiffusionDPOConfig). None: {INVERSION_DEFAULT_BETA:g}, 10x below Diffusion-DPO's default because the trajectory error is weighted by 1/(2 alpha_bar) (up to ~100 at the noisiest steps; on SD3 the velocity error's weight ((1 - sigma)^2 + sigma^2)/2 lies in [1/4, 1/2]); a starting point, not tuned (docs/inversion_dpo.md)."})
    inversion_num_steps: int = field(default=40, metadata={"help": "N: deterministic steps (DDIM with eta 0; the Euler ODE on SD3) of the inversion of each winner and loser through the reference (the paper's SD 1.5 default is 40, its SDXL script 80). Costs N guided reference forwards per image, once per run (cached)."})
    inversion_guidance_scale: float = field(default=2.0, metadata={"help": "Classifier-free guidance scale of the inversion and of the predictions (noise, or SD3's velocity) on the trajectory (policy and reference), as in the paper (2). 1 disables guidance (one UNet call instead of two)."})
    inversion_train_steps: int | None = field(default=None, metadata={"help": "Trajectory steps per pair trained with gradient in each update, drawn stratified over the N steps from the pair's generator (shared by winner and loser): an unbiased estimate of the weighted trajectory mean. None: all N steps (the paper's objective; N policy forwards and backwards per image and update)."})
    inversion_steps_per_call: int | None = field(default=None, metadata={"help": "Trained trajectory steps per policy UNet call: the 2 x train_batch_size x K trained states (x 2 with guidance) go through the UNet in calls of this many steps each (the same loss and gradient). With gradient_checkpointing each call is recomputed on its own in the backward pass, so the activation memory is that of one call: at SD size use e.g. 1-4 with gradient_checkpointing=True. None: all K steps in one call (fine for small models)."})
    inversion_sign: Literal["derived", "released"] = field(default="derived", metadata={"help": "`derived`: the logit of the trajectory likelihood ratio, u = -(beta/2)[(E_policy,w - E_ref,w) - (E_policy,l - E_ref,l)]: the winner's inverted trajectory is to be reproduced better than the reference does, the loser's worse (docs/inversion_dpo.md derives it). `released`: the opposite sign, as in the authors' released training script (it rewards a larger deviation from the reference on the winner's trajectory); logged figures keep the derived sign."})
    inversion_cache: bool = field(default=True, metadata={"help": "Keep each pair's inverted trajectory and the reference's predictions on it (on CPU, float32) after the first epoch that uses it: the reference is frozen, so later epochs reuse them. False recomputes them every time (2N guided reference forwards per image), for datasets too large to cache."})

    field_ranges = {**DiffusionDPOConfig.field_ranges, "inversion_num_steps": ">= 1", "inversion_guidance_scale": ">= 1",
                    "inversion_train_steps": ">= 1", "inversion_steps_per_call": ">= 1"}

    def validate(self) -> None:
        super().validate()
        if self.inversion_train_steps is not None:
            _check(self.inversion_train_steps <= self.inversion_num_steps, "inversion_train_steps",
                   f"must be at most inversion_num_steps={self.inversion_num_steps} (steps of the trajectory), got {self.inversion_train_steps}")
        _check(not self.random_flip, "random_flip",
               "must be False for Inversion-DPO: a pair's inversion is computed once and cached, so an image cannot be flipped per epoch")
        _check(self.winner_preserving_mu is None, "winner_preserving_mu",
               "is not supported with Inversion-DPO (the rescale is defined on one noisy latent's prediction residual, not on a trajectory)")

    @property
    def effective_beta(self) -> float:
        """``beta``, or :data:`INVERSION_DEFAULT_BETA` when it is None."""
        return float(self.beta) if self.beta is not None else INVERSION_DEFAULT_BETA


__all__ = ["INVERSION_DEFAULT_BETA", "InversionDPOConfig"]
