"""Differentiable image preprocessing for reward models, in torch only (no PIL, no torchvision).

The official reward packages preprocess with PIL: resize (bicubic, antialiased when shrinking), crop
or pad, ``ToTensor`` and normalise. Gradient-based trainers need the gradient of the reward w.r.t.
the pixels, so the same steps are written here as tensor operations on (B, 3, H, W) float images in
[0, 1]. ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` uses the same cubic kernel
(a = -0.5) and the same support widening as PIL, so the result differs from PIL only by PIL's
rounding to uint8 (and by clamping: we do not clamp the small bicubic overshoot, which would zero
the gradient of saturated pixels).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: mean / std used by OpenAI CLIP, OpenCLIP (HPSv2), PickScore, BLIP (ImageReward)
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of (B, C, H, W) ``images`` to ``size`` = (height, width); no-op if equal."""
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"resize target size must be positive, got {size}")
    if tuple(images.shape[-2:]) == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def resize_shortest_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio (torchvision ``Resize(int)``)."""
    height, width = images.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    new_hw = (new_short, new_long) if height <= width else (new_long, new_short)
    return resize(images, new_hw)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Crop the central ``size`` x ``size`` window (torchvision ``CenterCrop`` offsets)."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot center-crop {size}x{size} from an image of {height}x{width}; resize first")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def resize_longest_side_and_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Resize so that the longer side is ``size``, then pad to ``size`` x ``size`` with ``fill``.

    This is OpenCLIP's ``ResizeMaxSize`` (used by HPSv2): the padding is applied to the [0, 1] image,
    before normalisation, split as ``pad // 2`` before and the rest after.
    """
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))
    if scale == 1.0:
        return images
    new_h, new_w = round(height * scale), round(width * scale)
    images = resize(images, (new_h, new_w))
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    return images


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Channel-wise ``(images - mean) / std``."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mode: str = "crop",
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """The whole CLIP-style preprocessing of [0, 1] images, differentiable w.r.t. ``images``.

    ``mode="crop"``: shortest side to ``size`` then center crop (OpenAI CLIP, PickScore, aesthetic,
    ImageReward). ``mode="pad"``: longest side to ``size`` then zero padding (HPSv2).
    """
    if mode == "crop":
        images = center_crop(resize_shortest_side(images, size), size)
    elif mode == "pad":
        images = resize_longest_side_and_pad(images, size, fill=0.0)
    else:
        raise ValueError(f"preprocessing mode must be 'crop' or 'pad', got {mode!r}")
    return normalize(images, mean, std)
