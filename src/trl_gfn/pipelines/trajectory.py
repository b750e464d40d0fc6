"""Containers for sampled trajectories and for the transitions the trainers learn from."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from .conditioning import Conditioning


@dataclass
class Trajectories:
    """A batch of sampled trajectories, in sampling order (index ``i`` = step from x_{K-i} to x_{K-i-1}).

    Attributes:
        latents: (B, K + 1, C, h, w) states x_K, …, x_0 (float32).
        epsilons: (B, K, C, h, w) guided predictions ε̂_old recorded while sampling (float32): the sampler's prediction, i.e. the noise
            prediction for the UNet samplers and the velocity for the flow sampler (SD3; see ``trl_gfn.diffusion.noise_level``).
        prompt_embeds: conditioning of each sample's own prompt: (B, L, D) text-encoder states (SD 1.x/2.x) or a
            :class:`~trl_gfn.pipelines.Conditioning` with B rows (SDXL: token states, pooled embedding, time ids).
        negative_prompt_embeds: the same for the negative (unconditional) prompt.
        prompts, prompt_metadata: the prompts and their metadata, one per sample.
        images: (B, 3, H, W) decoded final samples in [0, 1] (float32).
        rewards: (B,) log-rewards of the final samples (filled in after scoring).
        sample_ids: (B,) global index of each sample in the epoch (identical for any number of processes).
    """

    latents: torch.Tensor
    epsilons: torch.Tensor
    prompt_embeds: torch.Tensor | Conditioning
    negative_prompt_embeds: torch.Tensor | Conditioning
    prompts: list[str]
    prompt_metadata: list[dict[str, Any]]
    images: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.epsilons.shape[1]

    def select(self, index: torch.Tensor | list[int]) -> Trajectories:
        """The sub-batch at ``index`` (tensors, lists and extras alike)."""
        index = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, Conditioning)):
                out[f.name] = value[index.to(value.device)]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in index.tolist()]
            elif isinstance(value, dict):
                out[f.name] = {k: v[index.to(v.device)] for k, v in value.items()}
            else:
                out[f.name] = value
        return replace(self, **out)

    @staticmethod
    def concatenate(parts: list[Trajectories]) -> Trajectories:
        """Concatenate batches along the sample dimension."""
        first = parts[0]
        out = {}
        for f in fields(first):
            values = [getattr(p, f.name) for p in parts]
            if values[0] is None:
                out[f.name] = None
            elif isinstance(values[0], (torch.Tensor, Conditioning)):
                out[f.name] = torch.cat(values)
            elif isinstance(values[0], list):
                out[f.name] = [item for v in values for item in v]
            else:
                out[f.name] = {k: torch.cat([v[k] for v in values]) for k in values[0]}
        return Trajectories(**out)


@dataclass
class TransitionBatch:
    """One transition x_k -> x_{k-1} per sample, at per-sample positions ``step_index`` (sampling order).

    ``next_epsilons`` is the recorded ε̂_old at x_{k-1} (zeros where x_{k-1} is the final sample).
    ``extras`` carries the trajectories' per-sample ``extras`` (e.g. DDPO's advantages) unchanged.
    ``trajectory`` numbers the trajectory of each row (rows of one trajectory share a number; None: every row its own),
    so that a loss can evaluate a state once when it is one row's x_{k-1} and another's x_k (:meth:`next_state_rows`).
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    step_index: torch.Tensor
    epsilons: torch.Tensor
    next_epsilons: torch.Tensor
    prompt_embeds: torch.Tensor | Conditioning
    negative_prompt_embeds: torch.Tensor | Conditioning
    prompts: list[str]
    prompt_metadata: list[dict[str, Any]]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    trajectory: torch.Tensor | None = None

    def next_state_rows(self) -> torch.Tensor:
        """(B,) for each row the row whose x_k is this row's x_{k-1} (the same trajectory's next transition), −1 where the
        batch has none (always so for the last transition, and without :attr:`trajectory`)."""
        n = self.step_index.shape[0]
        if self.trajectory is None:
            return torch.full((n,), -1, dtype=torch.long, device=self.step_index.device)
        traj = self.trajectory.to(self.step_index.device)
        match = (traj[:, None] == traj[None, :]) & (self.step_index[:, None] + 1 == self.step_index[None, :])
        return torch.where(match.any(1), match.long().argmax(1), torch.full_like(traj, -1))

    def previous_state_rows(self) -> torch.Tensor:
        """(B,) for each row the row whose x_{k-1} is this row's x_k (the inverse of :meth:`next_state_rows`), −1 where none."""
        succ = self.next_state_rows()
        prev = torch.full_like(succ, -1)
        has = succ >= 0
        prev[succ[has]] = has.nonzero().squeeze(1)
        return prev

    @classmethod
    def from_trajectories(cls, traj: Trajectories, step_index: torch.Tensor, rows: torch.Tensor | None = None) -> TransitionBatch:
        """Gather transition ``step_index[i]`` of trajectory ``rows[i]`` (default: of every trajectory ``i``, in order).
        ``rows`` may repeat a trajectory (several of its transitions in one batch); only the gathered states are copied."""
        device = traj.latents.device
        step_index = step_index.to(device)
        whole = rows is None
        rows = torch.arange(len(traj), device=device) if whole else torch.as_tensor(rows, dtype=torch.long, device=device)
        num_steps = traj.num_steps
        next_eps = traj.epsilons[rows, (step_index + 1).clamp(max=num_steps - 1)]
        next_eps = torch.where((step_index + 1 < num_steps).view(-1, 1, 1, 1), next_eps, torch.zeros_like(next_eps))

        def per_row(value):
            return value if whole else value[rows.to(value.device)]

        def per_row_list(items):
            return items if whole else [items[i] for i in rows.tolist()]

        return cls(
            latents=traj.latents[rows, step_index],
            next_latents=traj.latents[rows, step_index + 1],
            step_index=step_index,
            epsilons=traj.epsilons[rows, step_index],
            next_epsilons=next_eps,
            prompt_embeds=per_row(traj.prompt_embeds),
            negative_prompt_embeds=per_row(traj.negative_prompt_embeds),
            prompts=per_row_list(traj.prompts),
            prompt_metadata=per_row_list(traj.prompt_metadata),
            extras={k: per_row(v) for k, v in traj.extras.items()},
            trajectory=None if whole else rows,
        )
