"""Monte-Carlo ground truth for the residual flow gradient ∇ log F̃_k(x_k) that Nabla-GFlowNet learns.

The residual flow of a state is a property of the *reference* sampler alone:
``F̃_k(x) = E_ref[exp(β r(x_0)) | x_k = x]`` (the expectation over the reference model's stochastic
chain from ``x`` to ``x_0``). Roll the reference chain out ``num_rollouts`` times from ``x`` and weight
rollout j by ``w_j ∝ exp(β r(x_0^j))`` (self-normalised). Then (:func:`soft_value_gradient`)

- the ideal next-step mean is μ* = Σ_j w_j x'_j (x'_j the rollout's first step): the exact transition
  P*(x' | x) ∝ P_ref(x' | x) F̃(x') that a perfectly trained policy follows;
- ∇ log F̃_k(x) = J_μ(x)ᵀ (μ* − μ_ref(x)) / σ_k² (score-function form), or pathwise Σ_j w_j β ∇_x r(x_0^j).

Both are consistent as ``num_rollouts`` grows (bias O(1/n)); the Monte-Carlo error is reported from
independent chunks of rollouts. This is a diagnostic for small models (the bundled digits model): it
costs ``num_rollouts`` reference rollouts per state, not a training signal.

:func:`flow_gradient_report` compares any estimate of the flow gradient (a trainer's guess
``β γ_k ∇r(x̂_0)`` and flow head) with this ground truth, position by position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..diffusion import TransitionSchedule, step_mean


@dataclass
class SoftValueEstimate:
    """Monte-Carlo estimate of the residual flow at a batch of states.

    Attributes:
        grad: (B, C, h, w) estimate of ∇_x log F̃(x).
        log_value: (B,) estimate of log F̃(x) = log E_ref[exp(β r(x_0)) | x].
        ess: (B,) effective sample size of the self-normalised weights (of ``num_rollouts``).
        stderr: (B,) Monte-Carlo standard error of ``grad`` (L2 norm over the state), from independent chunks.
        optimal_score_residual: (B, C, h, w) (μ* − μ_ref)/σ² of the next step, with μ* = E[x_{k-1}] under the ideal
            transition P*(x_{k-1} | x) ∝ P_ref(x_{k-1} | x) F̃_{k-1}(x_{k-1}) (self-normalised over the rollouts'
            first steps): what a Gaussian policy's score residual s_θ − s_ref should be at x. Zeros at x_0.
    """

    grad: torch.Tensor
    log_value: torch.Tensor
    ess: torch.Tensor
    stderr: torch.Tensor
    optimal_score_residual: torch.Tensor


def _rollout_reference(pipeline, schedule: TransitionSchedule, latents: torch.Tensor, position: int, prompt_embeds, negative_embeds,
                       guidance_scale: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the reference sampler (adapter off) from state ``position`` to x_0, differentiably w.r.t. ``latents``.

    Returns ``(x_0, first_next_state, first_mean)`` (the state after the first step and that step's mean, detached)."""
    x = latents
    first = None
    n = x.shape[0]
    for i in range(position, schedule.num_steps):
        idx = torch.full((n,), i, device=x.device, dtype=torch.long)
        a = schedule.level(idx, like=x)
        eps = pipeline.guided_epsilon(pipeline.denoiser, x, schedule.timesteps[idx], prompt_embeds, negative_embeds, guidance_scale, a,
                                      schedule.prediction_type)
        mean = step_mean(x, eps, schedule.gather("coef_x", idx, like=x), schedule.gather("coef_eps", idx, like=x))
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
        x = mean + schedule.gather("std", idx, like=x) * noise
        if first is None:
            first = (x.detach(), mean.detach())
    return x, first[0], first[1]


def soft_value_gradient(
    pipeline,
    schedule: TransitionSchedule,
    reward_fn: Callable,
    latents: torch.Tensor,
    position: int,
    *,
    prompts: Sequence[str],
    guidance_scale: float,
    beta: float,
    num_rollouts: int = 1024,
    chunk_size: int = 512,
    prompt_metadata: Sequence[dict] | None = None,
    negative_prompt: str | None = None,
    estimator: str = "score",
    seed: int = 0,
) -> SoftValueEstimate:
    """Monte-Carlo estimate of ∇ log F̃ at ``latents`` (B, C, h, w), states at sampling position ``position``.

    ``position`` counts sampler steps already taken (0 = the initial noise, ``schedule.num_steps`` = the final
    sample x_0, where the answer is exactly β ∇r). Rollouts use the pipeline's reference model (LoRA adapter
    disabled) with the same guidance as sampling; rollout j has weight ``w_j ∝ exp(β r(x_0^j))``.

    ``estimator``:
    - ``"score"`` (default): ∇ log F̃(x) = E_{P*}[∇_x log P_ref(x' | x)] = J_μ(x)ᵀ (μ* − μ_ref(x)) / σ², with
      μ* = Σ_j w_j x'_j the weighted mean of the rollouts' first steps. The rollouts need no gradient; one
      vector-Jacobian product through the reference mean at x. Low variance for rewards that saturate
      (e.g. log-probabilities of a confident classifier, whose gradient vanishes where the weights live).
    - ``"pathwise"``: Σ_j w_j β ∇_x r(x_0^j(x)), back-propagating every rollout through the whole chain.

    ``num_rollouts`` must be a multiple of ``chunk_size`` when larger; with two or more chunks the standard
    error is estimated from the spread of the per-chunk estimates.
    """
    K = schedule.num_steps
    if not 0 <= position <= K:
        raise ValueError(f"position must be in [0, {K}], got {position}")
    if estimator not in ("score", "pathwise"):
        raise ValueError(f"estimator must be 'score' or 'pathwise', got {estimator!r}")
    if num_rollouts < 1 or (num_rollouts > chunk_size and num_rollouts % chunk_size):
        raise ValueError(f"num_rollouts ({num_rollouts}) must be >= 1 and a multiple of chunk_size ({chunk_size}) when larger")
    metadata = list(prompt_metadata) if prompt_metadata is not None else [{} for _ in prompts]
    if len(prompts) != latents.shape[0] or len(metadata) != latents.shape[0]:
        raise ValueError(f"got {latents.shape[0]} states but {len(prompts)} prompts and {len(metadata)} metadata entries")

    def reward(lat, prompt, meta):
        images = pipeline.decode(lat)
        return reward_fn(images, [prompt] * lat.shape[0], [meta] * lat.shape[0])[0].float()

    grads, logs, esss, errs, shifts = [], [], [], [], []
    gen = torch.Generator().manual_seed(seed)
    chunk = min(chunk_size, num_rollouts)
    with pipeline.reference_mode():
        for b in range(latents.shape[0]):
            x = latents[b:b + 1].detach().float()
            if position == K:
                xr = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    r = reward(xr, prompts[b], metadata[b])
                    (g,) = torch.autograd.grad(beta * r.sum(), xr)
                grads.append(g[0]), logs.append(beta * r.detach()[0]), esss.append(torch.tensor(1.0)), errs.append(torch.tensor(0.0))
                shifts.append(torch.zeros_like(g[0]))
                continue
            emb = pipeline.encode_prompts([prompts[b]]).expand(chunk, -1, -1)
            neg = pipeline.encode_negative_prompt(negative_prompt, chunk)
            std = schedule.std[position].to(x.dtype)
            # the reference mean at x and its VJP (for the score estimator)
            xg = x.clone().requires_grad_(True)
            idx = torch.full((1,), position, device=x.device, dtype=torch.long)
            with torch.enable_grad():
                a = schedule.level(idx, like=xg)
                eps = pipeline.guided_epsilon(pipeline.denoiser, xg, schedule.timesteps[idx], emb[:1], neg[:1], guidance_scale, a,
                                              schedule.prediction_type)
                mean_ref = step_mean(xg, eps, schedule.gather("coef_x", idx, like=xg), schedule.gather("coef_eps", idx, like=xg))
            log_w, parts_grad, parts_shift = [], [], []
            for _ in range(max(1, num_rollouts // chunk)):
                if estimator == "pathwise":
                    xr = x.expand(chunk, *x.shape[1:]).clone().requires_grad_(True)
                    with torch.enable_grad():
                        x0, x_first, _ = _rollout_reference(pipeline, schedule, xr, position, emb, neg, guidance_scale, gen)
                        r = reward(x0, prompts[b], metadata[b])
                        (g,) = torch.autograd.grad(beta * r.sum(), xr)  # row j: β ∇_x r(x_0^j(x))
                    w = torch.softmax(beta * r.detach(), 0).view(-1, 1, 1, 1)
                    parts_grad.append((w * g).sum(0))
                else:
                    with torch.no_grad():
                        x0, x_first, _ = _rollout_reference(pipeline, schedule, x.expand(chunk, *x.shape[1:]), position, emb, neg,
                                                            guidance_scale, gen)
                        r = reward(x0, prompts[b], metadata[b])
                    w = torch.softmax(beta * r, 0).view(-1, 1, 1, 1)
                log_w.append(beta * r.detach())
                parts_shift.append(((w * x_first).sum(0) - mean_ref[0].detach()) / std**2)
            lw = torch.cat(log_w)
            chunk_logz = torch.stack([torch.logsumexp(c, 0) for c in log_w])
            cw = torch.softmax(chunk_logz, 0)  # the chunks' shares of the total weight
            shift = sum(c * p for c, p in zip(cw, parts_shift))
            if estimator == "pathwise":
                grad = sum(c * p for c, p in zip(cw, parts_grad))
                parts = parts_grad
            else:
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad((mean_ref * shift).sum(), xg)
                grad = grad[0]
                parts = parts_shift  # error of the shift, propagated below through the same VJP scale
            if len(parts) >= 2:
                stacked = torch.stack(parts)
                spread = stacked - stacked.mean(0)
                err = spread.flatten(1).pow(2).sum(1).sum().div(len(parts) - 1).div(len(parts)).sqrt()
                if estimator == "score":  # relative error of the shift ≈ relative error of the gradient
                    err = err / shift.norm().clamp_min(1e-12) * grad.norm()
            else:
                err = torch.tensor(float("nan"))
            w_all = torch.softmax(lw, 0)
            grads.append(grad.detach()), logs.append(torch.logsumexp(lw, 0) - math.log(lw.numel())), esss.append(1 / (w_all**2).sum())
            errs.append(err.detach()), shifts.append(shift.detach())
    return SoftValueEstimate(grad=torch.stack(grads), log_value=torch.stack(logs), ess=torch.stack(esss), stderr=torch.stack(errs),
                             optimal_score_residual=torch.stack(shifts))


def combine_estimates(a: SoftValueEstimate, b: SoftValueEstimate) -> SoftValueEstimate:
    """Inverse-variance combination (per state, from the reported standard errors) of two estimates of the same
    gradient; the optimal score residual is taken from ``a`` (the score estimator's). A NaN error counts as infinite."""
    va = torch.nan_to_num(a.stderr**2, nan=float("inf")).clamp_min(1e-30)
    vb = torch.nan_to_num(b.stderr**2, nan=float("inf")).clamp_min(1e-30)
    wa = (1 / va) / (1 / va + 1 / vb)
    grad = wa.view(-1, 1, 1, 1) * a.grad + (1 - wa).view(-1, 1, 1, 1) * b.grad
    return SoftValueEstimate(grad=grad, log_value=a.log_value, ess=torch.minimum(a.ess, b.ess), stderr=(1 / (1 / va + 1 / vb)).sqrt(),
                             optimal_score_residual=a.optimal_score_residual)


def flow_gradient_report(
    estimators: dict[str, Callable[[torch.Tensor, int], torch.Tensor]],
    pipeline,
    schedule: TransitionSchedule,
    reward_fn: Callable,
    states: torch.Tensor,
    positions: Sequence[int],
    *,
    prompts: Sequence[str],
    guidance_scale: float,
    beta: float,
    num_rollouts: int = 512,
    chunk_size: int = 128,
    seed: int = 0,
    residual_estimators: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] | None = None,
    truths: dict[int, SoftValueEstimate] | None = None,
    pathwise_rollouts: int = 0,
) -> list[dict[str, float]]:
    """Error of flow-gradient estimates against the Monte-Carlo ground truth, per sampling position.

    Args:
        estimators: name -> ``f(latents, position) -> (B, C, h, w)`` estimate of ∇ log F̃ (e.g. a trainer's
            guess β γ ∇r(x̂_0) alone, and guess + flow head).
        states: (B, K + 1, C, h, w) recorded trajectories (``Trajectories.latents``); the states at each
            of ``positions`` are evaluated.

        residual_estimators: name -> ``f(latents, position) -> (B, C, h, w)`` a policy's score residual
            (μ_θ − μ_ref)/σ² of the step leaving ``position``, compared with the ideal transition's
            (:attr:`SoftValueEstimate.optimal_score_residual`); keys ``<name>_rel_error`` etc. as above.
        truths: position -> a precomputed :class:`SoftValueEstimate` at those states (reused, e.g. before and
            after training on the same states); missing ones are computed and added to the dict.
        pathwise_rollouts: if > 0, the ground truth combines the score estimate (``num_rollouts``) with a pathwise
            one (this many rollouts) by inverse-variance weighting per state: the score form is precise at noisy
            steps, the pathwise one at nearly noise-free steps.

    Returns one dict per position: ``position``, ``timestep``, ``true_norm`` (mean L2 norm of the
    estimate), ``mc_rel_error`` (mean MC standard error relative to that norm), ``ess``, and per
    estimator ``<name>_rel_error`` (mean ‖est − true‖ / ‖true‖), ``<name>_cosine`` and ``<name>_norm``.
    """
    K = schedule.num_steps
    rows = []
    for p in positions:
        x = states[:, p]
        if truths is not None and p in truths:
            truth = truths[p]
        else:
            truth = soft_value_gradient(pipeline, schedule, reward_fn, x, p, prompts=prompts, guidance_scale=guidance_scale, beta=beta,
                                        num_rollouts=num_rollouts, chunk_size=chunk_size, seed=seed + 1000 * p)
            if pathwise_rollouts and p < K:
                path = soft_value_gradient(pipeline, schedule, reward_fn, x, p, prompts=prompts, guidance_scale=guidance_scale, beta=beta,
                                           num_rollouts=pathwise_rollouts, chunk_size=min(chunk_size, pathwise_rollouts // 2),
                                           estimator="pathwise", seed=seed + 1000 * p + 1)
                truth = combine_estimates(truth, path)
            if truths is not None:
                truths[p] = truth
        tn = truth.grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        row = {"position": int(p), "timestep": int(schedule.timesteps[p]) if p < K else 0, "true_norm": float(tn.mean()),
               "mc_rel_error": float((truth.stderr / tn).mean()), "ess": float(truth.ess.mean())}
        for name, fn in estimators.items():
            est = fn(x, p).detach().float().flatten(1)
            t = truth.grad.flatten(1)
            row[f"{name}_rel_error"] = float(((est - t).norm(dim=1) / tn).mean())
            row[f"{name}_cosine"] = float(torch.nn.functional.cosine_similarity(est, t, dim=1).mean())
            row[f"{name}_norm"] = float(est.norm(dim=1).mean())
        if p < K:
            opt = truth.optimal_score_residual.flatten(1)
            on = opt.norm(dim=1).clamp_min(1e-12)
            row["optimal_residual_norm"] = float(on.mean())
            for name, fn in (residual_estimators or {}).items():
                est = fn(x, p).detach().float().flatten(1)
                row[f"{name}_rel_error"] = float(((est - opt).norm(dim=1) / on).mean())
                row[f"{name}_cosine"] = float(torch.nn.functional.cosine_similarity(est, opt, dim=1).mean())
                row[f"{name}_norm"] = float(est.norm(dim=1).mean())
        rows.append(row)
    return rows


__all__ = ["SoftValueEstimate", "combine_estimates", "flow_gradient_report", "soft_value_gradient"]
