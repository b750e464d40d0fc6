"""The small scoring heads shared by the aesthetic predictor and ImageReward."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class AffineMLPHead(nn.Module):
    """``Linear`` layers with dropout in between and **no** activation: an affine map to one score.

    Both the LAION aesthetic predictor v2 and ImageReward use 768-1024-128-64-16-1 with dropout after
    the first three layers, so their checkpoints have the keys ``layers.{0,2,4,6,7}.{weight,bias}``;
    this module reproduces that layout for any ``hidden_dims``. (The activations are commented out in
    the original code: the head is affine, which is why a single matrix would do, but the layout is kept
    so the official files load unchanged.)
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (1024, 128, 64, 16), dropout: Sequence[float] = (0.2, 0.2, 0.1)):
        super().__init__()
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one hidden width")
        layers: list[nn.Module] = []
        width = input_dim
        for i, h in enumerate(hidden_dims):
            layers.append(nn.Linear(width, h))
            if i < len(hidden_dims) - 1:
                layers.append(nn.Dropout(dropout[i] if i < len(dropout) else 0.0))
            width = h
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map (B, input_dim) features to (B,) scores."""
        return self.layers(features).squeeze(-1)
