"""JPEG compressibility: DDPO's non-differentiable reward (Black et al., 2024, ``jpeg_compressibility``)."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch

from .base import RewardModel


class JpegCompressibilityReward(RewardModel):
    """Reward = −(JPEG file size in kB) of each image: smaller files (simpler images) score higher.

    Images are quantised to 8-bit RGB and encoded with PIL at ``quality`` (95, as in DDPO); 1 kB = 1000
    bytes. The reward is computed with PIL, so it is **not differentiable** (``differentiable = False``):
    use it with :class:`~trl_gfn.DDPOTrainer`. ``incompressibility=True`` gives DDPO's
    ``jpeg_incompressibility`` (+kB) instead. It has no parameters and ignores the prompts.
    """

    differentiable = False

    def __init__(self, quality: int = 95, incompressibility: bool = False):
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.quality = int(quality)
        self.incompressibility = bool(incompressibility)
        self.name = "jpeg_incompressibility" if incompressibility else "jpeg_compressibility"

    def extra_repr(self) -> str:
        return f"quality={self.quality}, incompressibility={self.incompressibility}"

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str], prompt_metadata: Sequence[dict]) -> torch.Tensor:
        from PIL import Image

        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        kb = torch.tensor(sizes, dtype=torch.float32, device=images.device)
        return kb if self.incompressibility else -kb


__all__ = ["JpegCompressibilityReward"]
