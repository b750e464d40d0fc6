"""Reward combinators: wrap a plain scoring function, or sum several rewards with weights."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .base import RewardModel, check_images, validate_rewards


class CallableReward(RewardModel):
    """Turn any ``fn(images, prompts, prompt_metadata) -> rewards`` into the reward contract.

    ``fn`` may return a tensor / sequence of B rewards, or already a ``(rewards, metadata)`` pair. The
    wrapper checks the images, calls ``fn`` in float32 with autocast disabled, converts the rewards to a
    float32 tensor of shape (B,) and validates them (shape, finiteness). If ``fn`` is an ``nn.Module`` it
    becomes a sub-module (``.to(device)`` moves it).

    Args:
        fn: the scoring function.
        differentiable: whether ``fn``'s rewards carry a gradient w.r.t. ``images``. Gradient-based
            trainers refuse rewards declared non-differentiable; set it to ``False`` for numpy/PIL code
            (then only DDPO can use the reward).
        name: label used in logs and error messages (default: the function's name).
    """

    def __init__(self, fn: Callable[..., Any], differentiable: bool = True, name: str | None = None):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"CallableReward needs a callable `fn`, got {type(fn).__name__}")
        self.fn = fn  # an nn.Module is registered as a sub-module by this assignment
        self.differentiable = bool(differentiable)
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None, prompt_metadata: Sequence[dict] | None = None):
        check_images(images)
        batch = images.shape[0]
        prompts = list(prompts) if prompts is not None else [""] * batch
        prompt_metadata = list(prompt_metadata) if prompt_metadata is not None else [{} for _ in range(batch)]
        device_type = images.device.type if images.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            out = self.fn(images.float(), prompts, prompt_metadata)
        if isinstance(out, tuple) and len(out) == 2 and (out[1] is None or isinstance(out[1], Mapping)):
            rewards, metadata = out
        else:
            rewards, metadata = out, {}
        if not isinstance(rewards, torch.Tensor):
            rewards = torch.as_tensor(rewards, dtype=torch.float32, device=images.device)
        rewards = rewards.float()
        return validate_rewards((rewards, dict(metadata or {})), batch, where=f"reward {self.name!r}")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"


class CompositeReward(RewardModel):
    """Weighted sum of rewards, ``r = Σ_i w_i r_i``, each term reported in the metadata.

    The metadata holds ``"reward_<name>"``: the unweighted term, detached, shape (B,), for logging, and
    each term's own metadata under ``"<name>/<key>"``. The composite is differentiable when every term is.

    Args:
        rewards: mapping name -> reward (a :class:`RewardModel` or any callable with the contract or the
            plain ``(images, prompts, metadata) -> rewards`` signature, wrapped with :class:`CallableReward`).
        weights: mapping name -> weight (default 1 for every term); keys must be names of ``rewards``.

    Example::

        reward = CompositeReward({"aesthetic": AestheticScorer.from_pretrained(a), "hps": HPSv2Scorer.from_pretrained(h)},
                                 weights={"aesthetic": 1.0, "hps": 20.0})
    """

    def __init__(self, rewards: Mapping[str, Callable[..., Any]], weights: Mapping[str, float] | None = None):
        super().__init__()
        if not isinstance(rewards, Mapping) or not rewards:
            raise ValueError("CompositeReward needs a non-empty mapping name -> reward")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(rewards))
        if unknown:
            raise ValueError(f"CompositeReward weights name unknown terms {unknown}; terms are {sorted(rewards)}")
        terms = {}
        for name, fn in rewards.items():
            if "." in name or "/" in name or not name:
                raise ValueError(f"CompositeReward term name {name!r} must be non-empty without '.' or '/'")
            terms[name] = fn if isinstance(fn, RewardModel) else CallableReward(fn, name=name)
        self.terms = nn.ModuleDict(terms)
        self.weights = {name: float(weights.get(name, 1.0)) for name in rewards}
        self.differentiable = all(getattr(t, "differentiable", True) for t in self.terms.values())

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None, prompt_metadata: Sequence[dict] | None = None):
        check_images(images)
        batch = images.shape[0]
        total = None
        metadata: dict[str, Any] = {}
        for name, term in self.terms.items():
            rewards, term_md = validate_rewards(term(images, prompts, prompt_metadata), batch, where=f"CompositeReward term {name!r}")
            rewards = rewards.to(device=images.device, dtype=torch.float32)
            metadata[f"reward_{name}"] = rewards.detach()
            for key, value in term_md.items():
                metadata[f"{name}/{key}"] = value
            weighted = self.weights[name] * rewards
            total = weighted if total is None else total + weighted
        return total, metadata

    def extra_repr(self) -> str:
        return "weights=" + ", ".join(f"{k}={v:g}" for k, v in self.weights.items())
