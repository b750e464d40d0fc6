"""Losses of the Diffusion-DPO family as pure functions of per-pair denoising errors (no model, no I/O).

Notation (docs/preference.md derives every formula). For a pair with shared noise ε and timestep t, ``err`` is the
squared error of a noise prediction **averaged over the latent's elements** (one number per image); θ is the policy
(LoRA on), ref the reference (adapter off). The Diffusion-DPO logit is

    u = −(β/2)·[(err_θ,w − err_ref,w) − (err_θ,l − err_ref,l)],

the pixel mean taken *inside* the sigmoid (diffusers issue #6702 averaged the loss over pixels instead). ``u`` is
β times the ELBO estimate of the implicit log-likelihood-ratio margin h = log[π_θ(w)π_ref(l) / (π_ref(w)π_θ(l))],
with log π(x) ≈ −err(x)/2 up to a per-model constant and a positive scale that β absorbs. Each loss maps ``u`` (and
what else it needs) to a per-pair loss; the trainer averages over pairs. Every function works on any float dtype;
the trainer passes float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: the ``loss_type`` values of :class:`~trl_gfn.configs.DiffusionDPOConfig`
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "dmpo", "see", "adaptive", "sft")


@dataclass
class PairErrors:
    """Per-pair denoising errors (each of shape (B,)): policy and reference, on the preferred (w) and other (l) image."""

    policy_w: torch.Tensor
    policy_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor

    @property
    def winner_gap(self) -> torch.Tensor:
        """err_θ,w − err_ref,w (negative when the policy denoises the preferred image better than the reference)."""
        return self.policy_w - self.ref_w

    @property
    def loser_gap(self) -> torch.Tensor:
        """err_θ,l − err_ref,l (positive when the policy denoises the other image worse than the reference)."""
        return self.policy_l - self.ref_l


def dpo_logit(errors: PairErrors, beta: float) -> torch.Tensor:
    """Diffusion-DPO's logit u = −(β/2)·[(err_θ,w − err_ref,w) − (err_θ,l − err_ref,l)] (shape (B,))."""
    return -0.5 * beta * (errors.winner_gap - errors.loser_gap)


def see_logit(errors: PairErrors, beta: float, gamma: float) -> torch.Tensor:
    """SEE-DPO's logit: u − (γ/2)·(err_θ,w − err_θ,l), the DPO logit of the entropy-regularised objective.

    With an entropy bonus γ·H(π_θ) added to the KL-regularised reward objective, the optimal policy is
    π* ∝ π_ref^{β/(β+γ)}·exp(r/(β+γ)) (the reference is flattened) and the implicit reward is
    r = (β+γ)·log π_θ − β·log π_ref, so r_w − r_l = β·h + γ·(log π_θ(w) − log π_θ(l)); with log π ≈ −err/2 this is
    the returned value. γ = 0 gives :func:`dpo_logit` exactly.
    """
    return dpo_logit(errors, beta) - 0.5 * gamma * (errors.policy_w - errors.policy_l)


# ------------------------------------------------------------------------------------------------ losses of u
def sigmoid_loss(u: torch.Tensor) -> torch.Tensor:
    """Diffusion-DPO: −log σ(u), computed as softplus(−u) (finite for any u)."""
    return F.softplus(-u)


def hinge_loss(u: torch.Tensor) -> torch.Tensor:
    """Hinge (SLiC) form: max(0, 1 − u)."""
    return torch.relu(1.0 - u)


def ipo_loss(u: torch.Tensor) -> torch.Tensor:
    """IPO: (u − 1/2)², i.e. β²·(h − 1/(2β))² with h = u/β (IPO's squared loss with regularisation τ = β).

    The constant β² keeps the gradient on the scale of the other losses (Adam is invariant to it up to ε and clipping).
    diffusers' research example computed ``(logits - 1/(2*args.beta))**2`` with an argument that does not exist.
    """
    return (u - 0.5) ** 2


def dmpo_loss(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """DMPO: reverse KL(Bernoulli(σ(u)) ‖ Bernoulli(1 − α)) between the model's implied preference and the target.

    σ(u)·(log σ(u) − log(1 − α)) + σ(−u)·(log σ(−u) − log α), with log σ(±u) = −softplus(∓u) and log(1 − α) = log1p(−α)
    (finite for any u and any 0 < α < 1). Minimised (value 0) at u = log((1 − α)/α) (≈ 4.6 for α = 0.01); the gradient
    σ(u)σ(−u)·(u − log((1 − α)/α)) vanishes for pairs the model strongly disagrees with (mode seeking). The forward KL,
    KL(Bernoulli(1) ‖ Bernoulli(σ(u))) = −log σ(u), is Diffusion-DPO's loss.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"dmpo_loss: alpha must be in (0, 1), got {alpha}")
    p = torch.sigmoid(u)
    return p * (-F.softplus(-u) - math.log1p(-alpha)) + (1.0 - p) * (-F.softplus(u) - math.log(alpha))


# ------------------------------------------------------------------------------------------------ Adaptive-DPO
def adaptive_metric(logits: torch.Tensor, rho: float) -> torch.Tensor:
    """Adaptive-DPO's minority-instance metric from the DPO logits of K models (shape (K, B), detached).

    m = (1 − mean_k σ(ρ·u_k)) · min(std_k(ρ·u_k), 1): the first factor (intra-annotator confidence) is the
    probability the models give to the label being wrong, the second (inter-annotator stability) how much the
    models (the current one and its EMA copies) disagree. Returns m in [0, 1], shape (B,).
    """
    if logits.ndim != 2 or logits.shape[0] < 2:
        raise ValueError(f"adaptive_metric needs the logits of at least 2 models, shape (K >= 2, B); got {tuple(logits.shape)}")
    scaled = rho * logits.detach()
    confidence = 1.0 - torch.sigmoid(scaled).mean(dim=0)
    stability = scaled.std(dim=0).clamp(max=1.0)
    return confidence * stability


def adaptive_loss(u: torch.Tensor, metric: torch.Tensor, temperature: float, intercept: float, margin: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-DPO: w·(−log σ(u + δ)) with instance weight w = 1/(T·m + c) and adaptive margin δ = m (linear) or m².

    Pairs the models judge to be minority labels (large m) are down-weighted and count as partly satisfied already;
    at m = 0 (every pair at the start of training) the loss is Diffusion-DPO's divided by c. Returns (per-pair loss,
    weights).
    """
    if margin not in ("linear", "quadratic"):
        raise ValueError(f"adaptive_loss: margin must be 'linear' or 'quadratic', got {margin!r}")
    m = metric.detach()
    weight = 1.0 / (temperature * m + intercept)
    delta = m if margin == "linear" else m * m
    return weight * F.softplus(-(u + delta)), weight


# ------------------------------------------------------------------------------------------------ helpers
def soft_label_loss(loss_of_u, u: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """p·L(u) + (1 − p)·L(−u): a pair whose preferred image wins with probability p (1 for a hard label, 0.5 for a tie)."""
    hard = label >= 1.0
    if bool(hard.all()):
        return loss_of_u(u)
    return label * loss_of_u(u) + (1.0 - label) * loss_of_u(-u)


def winner_preserving_scale(residual_w: torch.Tensor, residual_l: torch.Tensor, mu: float) -> torch.Tensor:
    """Diffusion-SDPO's per-pair scale λ ∈ [0, 1] of the loser error's gradient (detached; shape (B,)).

    ``residual_w/l`` are the prediction residuals (policy output − target) of the winner and the loser, the output-space
    gradients g_w, g_l of their errors up to a common factor. The update −g_w + λ·g_l must satisfy
    (−g_w + λ g_l)·g_w ≤ −μ‖g_w‖², so λ = min(1, (1 − μ)‖g_w‖² / (g_l·g_w)) when g_l·g_w > 0, else 1: to first order the
    winner's error does not increase. Applied per pair (the public code pools the batch; the per-pair conditions sum to it).
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"winner_preserving_scale: mu must be in [0, 1], got {mu}")
    gw = residual_w.detach().flatten(1).double()
    gl = residual_l.detach().flatten(1).double()
    dot = (gw * gl).sum(dim=1)
    cap = (1.0 - mu) * gw.pow(2).sum(dim=1) / dot.clamp_min(torch.finfo(torch.float64).tiny)
    scale = torch.where(dot > 0, cap.clamp(0.0, 1.0), torch.ones_like(dot))
    return scale.to(residual_w.dtype)


def scale_gradient(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` in the forward pass, ``scale · ∂x`` in the backward pass."""
    return x.detach() + scale * (x - x.detach())


def implicit_accuracy(u: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose logit ranks the preferred image first (u > 0), a tie u = 0 counting one half."""
    return ((u > 0).float() + 0.5 * (u == 0).float()).mean()


__all__ = ["LOSS_TYPES", "PairErrors", "adaptive_loss", "adaptive_metric", "dmpo_loss", "dpo_logit", "hinge_loss",
           "implicit_accuracy", "ipo_loss", "scale_gradient", "see_logit", "sigmoid_loss", "soft_label_loss", "winner_preserving_scale"]
