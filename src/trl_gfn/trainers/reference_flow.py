"""Nabla-GFlowNet's flow head trained on reference trajectories resampled towards the target
(``flow_head_trajectories="reference_resampled"``, docs/nabla_gfn.md).

Why: the reverse ∇-DB identity ∇log F̃_k(x) = E[J_refᵀ ∇log F̃_{k-1}(x') | x_k = x] holds for x' drawn from the ideal
step P*(x'|x) ∝ P_ref(x'|x)·F̃_{k-1}(x'), not from the policy. Trained on the policy's own continuations the flow head
learns whatever the current policy implies (docs/benchmark.md, *What sets the mode weights*). Trajectories of the
reference sampler weighted by exp(β r(x_0)) are distributed as the target's path measure,
P*(τ) = P_ref(τ)·exp(β r(x_0))/Z, so on them the identity holds exactly and the flow head's target does not move with
the policy. :class:`ReferenceFlowTraining` samples and resamples those trajectories and computes the flow head's terms
on them; the trainer's forward term still trains the policy on its own transitions.
"""

from __future__ import annotations

import dataclasses

import torch

from ..diffusion import score_residual
from ..pipelines import Trajectories, TransitionBatch
from .base import sample_seed

#: extras key of the resampled reference trajectory (B, K + 1, C, h, w) paired with each policy trajectory
REFERENCE_LATENTS = "flow_reference_latents"


def group_keys(prompts: list[str], metadata: list[dict]) -> list[str]:
    """One key per sample: trajectories are exchangeable for the resampling only under the same prompt and metadata
    (each prompt has its own target p_ref(x|c)·exp(β r(x, c)) and normaliser)."""
    return [f"{p}\x00{sorted(m.items(), key=lambda kv: kv[0])!r}" for p, m in zip(prompts, metadata)]


def resample_in_groups(log_weights: torch.Tensor, candidate_keys: list[str], keys: list[str], generator: torch.Generator
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """For each of ``keys`` draw one candidate index with the same key, with probability ∝ exp(log_weights) within the
    group. Returns the indices and each group's effective sample size (Σw)²/Σw² of its weights."""
    by_key: dict[str, list[int]] = {}
    for i, k in enumerate(candidate_keys):
        by_key.setdefault(k, []).append(i)
    probs, ess = {}, {}
    for k, members in by_key.items():
        w = torch.softmax(log_weights[members].double(), dim=0)
        probs[k] = (torch.tensor(members), w)
        ess[k] = float(1.0 / (w**2).sum())
    chosen = []
    for k in keys:
        if k not in probs:
            raise RuntimeError(f"no reference candidate was sampled for prompt/metadata group {k!r}")
        members, w = probs[k]
        chosen.append(int(members[torch.multinomial(w, 1, generator=generator)]))
    return torch.tensor(chosen, dtype=torch.long), ess


class ReferenceFlowTraining:
    """Mixin of :class:`~trl_gfn.NablaGFlowNetTrainer`: reference trajectories resampled ∝ exp(β r(x_0)) for the flow
    head's reverse and terminal terms. Active with ``flow_head_trajectories="reference_resampled"``."""

    @property
    def trains_flow_on_reference(self) -> bool:
        return self.config.flow_head_trajectories == "reference_resampled"

    @torch.no_grad()
    def attach_reference_trajectories(self, samples: Trajectories, epoch: int) -> Trajectories:
        """Sample ``flow_reference_candidates`` reference trajectories per policy trajectory (its prompt and metadata, the
        sampling CFG, own seeds), score them, and store in ``samples.extras[REFERENCE_LATENTS]`` one per policy
        trajectory, drawn ∝ exp(β r(x_0)) among the candidates of its prompt group. Logs the groups' mean ESS and the
        candidates' mean reward (``flow_reference_ess``, ``flow_reference_reward_mean``)."""
        c = self.config
        n, R = len(samples), c.flow_reference_candidates
        device = self.accelerator.device
        ids = samples.sample_ids.tolist() if samples.sample_ids is not None else list(range(n))
        prompts = [samples.prompts[i % n] for i in range(R * n)]
        metadata = [samples.prompt_metadata[i % n] for i in range(R * n)]
        latents, rewards = [], []
        for start in range(0, R * n, c.sample_batch_size):
            part = list(range(start, min(start + c.sample_batch_size, R * n)))
            traj = self.sample_reference([prompts[i] for i in part], [metadata[i] for i in part],
                                         [sample_seed(c.seed, epoch, ids[i % n], i // n, 43) for i in part])
            r, _ = self.score_no_grad(traj.images, traj.prompts, traj.prompt_metadata)
            latents.append(traj.latents.float())
            rewards.append(r.float().to(device))
        latents, rewards = torch.cat(latents), torch.cat(rewards)
        gen = torch.Generator().manual_seed(sample_seed(c.seed, epoch, self.accelerator.process_index, 47))
        keys = group_keys(samples.prompts, samples.prompt_metadata)
        chosen, ess = resample_in_groups(self.reward_scale_now * rewards.cpu(), group_keys(prompts, metadata), keys, gen)
        samples.extras[REFERENCE_LATENTS] = latents[chosen.to(latents.device)]
        self.log({"flow_reference_ess": sum(ess.values()) / len(ess), "flow_reference_reward_mean": float(rewards.mean())},
                 step=self.state.global_step)
        return samples

    def reference_flow_terms(self, batch: TransitionBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss_reverse, loss_terminal, loss_forward)`` on the reference transitions paired with the batch's rows (same
        step index, prompt and metadata): g_φ(x_k) regresses onto J_refᵀ f(x_{k-1}) − guess(x_k), f = guess + g_φ
        (detached; β∇r(x_0) on the last step), and g_φ(x_0) onto 0; with ``train_policy_on_reference_trajectories`` the
        policy's score residual at x_k onto f(x_{k-1}) (the forward term, whose regression target is then the ideal step's
        mean shift E_P*[f(x')], not the policy's own average) — or, with ``reference_forward_target="location"``, onto
        (x_{k-1} − μ_ref(x_k))/σ², whose expectation is the same mean shift without any flow estimate — else 0. Means over
        the batch's rows."""
        c, sched = self.config, self.schedule
        ref = batch.extras[REFERENCE_LATENTS]
        rows = torch.arange(batch.step_index.shape[0], device=ref.device)
        at = batch.step_index.to(ref.device)
        # the paired reference transitions, with the batch's prompts; their ε̂ are never read (recomputed below)
        batch = dataclasses.replace(batch, latents=ref[rows, at], next_latents=ref[rows, at + 1])
        x, x_next, idx, last, inter, t, a, cx, ce, std = self._transition(batch)
        inter_f = inter.view(-1, 1, 1, 1).to(x.dtype)
        emb, neg = batch.prompt_embeds, batch.negative_prompt_embeds
        guess_next = self.reward_guess(x_next, idx + 1, emb, neg, batch.prompts, batch.prompt_metadata)
        head = self.wrapped("flow_head", checkpoint=True if c.memory_efficient_order else None)
        g_next, g_cur = self.flow_head_at_states(head, batch, x, x_next, t, sched.next_timesteps[idx], emb, torch.ones_like(last))
        flow_next = guess_next + g_next.detach() * inter_f
        xr = x.detach().requires_grad_(True)
        with self.pipeline.reference_mode(), torch.enable_grad():
            eps_ref = self._guided(self._input_gradient_unet(), xr, t, batch, None, a)
            ref_side = self.reference_input_gradient(xr, eps_ref, a, ce * flow_next, torch.ones_like(last) if c.reward_scale > 0 else None, batch)
        target = cx * flow_next + ref_side  # J_refᵀ f(x_{k-1}) − guess(x_k), J_ref = ∂μ_ref/∂x_k = coef_x + coef_eps ∂ε̂_ref/∂x_k
        weight = std**2 if c.transition_loss_weighting == "variance" else torch.ones_like(std)
        loss_reverse = (weight * (g_cur - target) ** 2).mean()
        loss_terminal = (g_next[last] ** 2).sum() / g_next.numel() if bool(last.any()) else g_next.new_zeros(())
        loss_forward = g_next.new_zeros(())
        if c.train_policy_on_reference_trajectories:
            eps = self._guided(self.wrapped("unet"), x, t, batch, None, a)
            if c.reference_forward_target == "location":  # (x' − μ_ref(x_k))/σ²: the ideal step's own draw, no flow estimate
                target = (x_next - (cx * x + ce * eps_ref.detach())) / std**2
            else:
                target = flow_next
            loss_forward = (weight * (score_residual(eps, eps_ref.detach(), ce, std) - target) ** 2).mean()
        return loss_reverse, loss_terminal, loss_forward
