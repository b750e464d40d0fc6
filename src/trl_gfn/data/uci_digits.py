"""The UCI handwritten digits that scikit-learn ships, as the bundled digits models see them.

One loader for everything trained or judged on these digits (the diffusion model, the reward's classifier, the
benchmark's judges), so that they all agree on the images and on the train / held-out split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def load_digit_images(seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images (N, 3, 16, 16) in [0, 1] (white ink on black) and labels (N,).

    The 1,797 8x8 images (17 grey levels) are scaled to [0, 1], bilinearly upsampled to 16x16 and replicated to 3
    channels, then split stratified by class with ``random_state=seed``. Needs scikit-learn (its bundled copy of the
    data; nothing is downloaded).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - scikit-learn is in the test requirements
        raise ImportError("the UCI digits come with scikit-learn: pip install scikit-learn") from e

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    y = torch.tensor(data.target, dtype=torch.long)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=data.target)
    tr, te = torch.as_tensor(np.sort(tr)), torch.as_tensor(np.sort(te))
    return x[tr], y[tr], x[te], y[te]


__all__ = ["load_digit_images"]
