"""The reward contract shared by every trainer.

``reward_fn(images, prompts, prompt_metadata) -> (rewards, reward_metadata)`` with ``images`` a float
tensor in [0, 1] of shape (B, 3, H, W) and ``rewards`` of shape (B,), read as *log*-rewards.
Gradient-based trainers differentiate ``rewards`` w.r.t. ``images``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

RewardOutput = tuple[torch.Tensor, dict[str, Any]]
RewardFunction = Callable[[torch.Tensor, Sequence[str], Sequence[dict]], RewardOutput]


class RewardModel(nn.Module):
    """Base class of the reward modules: validates the input and scores in float32.

    Subclasses implement :meth:`score`. Calling the module autocasts nothing: images are cast to
    float32 and autocast is disabled, because reward gradients in bf16 are too coarse to train on.
    Parameters are frozen (a reward is a fixed target, never trained by the aligner).
    """

    #: whether ``rewards`` can be differentiated w.r.t. ``images`` (gradient-based trainers check it)
    differentiable: bool = True

    def score(self, images: torch.Tensor, prompts: Sequence[str], prompt_metadata: Sequence[dict]) -> torch.Tensor:
        raise NotImplementedError

    def freeze(self) -> RewardModel:
        """Freeze every parameter and switch to eval mode; returns ``self``."""
        self.requires_grad_(False)
        self.eval()
        return self

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None, prompt_metadata: Sequence[dict] | None = None) -> RewardOutput:
        check_images(images)
        batch = images.shape[0]
        prompts = list(prompts) if prompts is not None else [""] * batch
        prompt_metadata = list(prompt_metadata) if prompt_metadata is not None else [{} for _ in range(batch)]
        if len(prompts) != batch:
            raise ValueError(f"got {batch} images but {len(prompts)} prompts")
        device_type = images.device.type if images.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            rewards = self.score(images.float(), prompts, prompt_metadata)
        return rewards, {}


def check_images(images: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless ``images`` is a float (B, 3, H, W) tensor."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"reward input `images` must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"reward input `images` must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"reward input `images` must be a float tensor in [0, 1], got dtype {images.dtype}")


def validate_rewards(output: Any, batch_size: int, *, need_grad: bool = False, where: str = "reward_fn") -> tuple[torch.Tensor, dict]:
    """Check a reward function's return value against the contract; return ``(rewards, metadata)``.

    Raises a ``ValueError`` naming what is wrong: not a ``(rewards, metadata)`` pair, wrong shape,
    non-finite values, or (``need_grad``) rewards that carry no gradient w.r.t. the images.
    """
    if isinstance(output, tuple) and len(output) == 2:
        rewards, metadata = output
    else:
        raise ValueError(
            f"{where} must return a pair (rewards, reward_metadata), got {type(output).__name__}; "
            "wrap a plain scoring function with trl_gfn.rewards.CallableReward"
        )
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.ndim == 2 and rewards.shape[1] == 1:
        raise ValueError(f"{where} returned rewards of shape {tuple(rewards.shape)}; expected ({batch_size},): squeeze the last dim")
    if tuple(rewards.shape) != (batch_size,):
        raise ValueError(f"{where} returned rewards of shape {tuple(rewards.shape)}; expected ({batch_size},)")
    if not torch.isfinite(rewards.detach()).all():
        bad = (~torch.isfinite(rewards.detach())).nonzero().flatten().tolist()
        raise ValueError(f"{where} returned non-finite rewards (NaN or inf) at batch positions {bad}")
    if need_grad and not rewards.requires_grad:
        raise ValueError(
            f"{where} returned rewards without a gradient w.r.t. the images; this trainer back-propagates "
            "the reward, so the reward must be differentiable (no torch.no_grad, .detach(), numpy or PIL inside). "
            "Use DDPOTrainer for non-differentiable rewards."
        )
    return rewards, (metadata if metadata is not None else {})
