"""Independent judges of the digits benchmark's classes: is a sampler's class histogram real, or reward hacking?

The digits benchmark's reward r(x) = log p(y ∈ S | x) comes from the bundled classifier, and by default the same
classifier assigns every evaluation sample its class. A sampler that follows ∇r can move that classifier's argmax with
a pattern that is not another digit; the TV it reads would then be too good. A judge gives no reward and no gradient,
so nothing was optimised against it:

- ``judge_cnn``: a second CNN, trained here on the same digits with another split, initialisation and width
  (:data:`~trl_gfn.assets.BUNDLED_DIGIT_JUDGE`, ``scripts/train_digit_classifier.py --seed 2 --width 32``);
- ``pixel_knn``: k nearest neighbours in grey pixel space over the training split of the digits (nothing learned,
  so no feature it shares with the reward's CNN; less accurate, 97 % held out).

A judge also disagrees with the reward's classifier on some natural digits. So a sampler is compared with the ideal
target *as the same judge sees it*: the same self-normalised weights exp(β r) on the reference base samples, the
classes from the judge (:func:`judged_target_histogram`). An exact sampler of the target reads the same TV under
every judge, up to sampling noise.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from .metrics import ideal_target_histogram

Judge = Callable[[torch.Tensor], torch.Tensor]


class PixelNearestNeighbours:
    """k-nearest-neighbour digit classifier on grey-scale pixels (Euclidean), a judge with no learned features.

    Args:
        images: (N, 3, H, W) or (N, 1, H, W) labelled images in [0, 1] (the training split of the digits).
        labels: (N,) integer classes.
        k: neighbours that vote; a tie goes to the class of the nearest neighbour among the tied classes.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, k: int = 5):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}")
        if len(labels) < k:
            raise ValueError(f"need at least k = {k} labelled images, got {len(labels)}")
        self.k = int(k)
        self.size = tuple(images.shape[-2:])
        self.points = self._flat(images)
        self.labels = labels.long().cpu()
        self.num_classes = int(self.labels.max()) + 1

    def _flat(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.size:
            raise ValueError(f"PixelNearestNeighbours was fitted on (N, C, {self.size[0]}, {self.size[1]}) images, got {tuple(images.shape)}")
        return images.detach().float().cpu().mean(dim=1).flatten(1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) predicted classes of (B, C, H, W) images in [0, 1]."""
        dist = torch.cdist(self._flat(images), self.points)
        order = dist.topk(self.k, dim=1, largest=False).indices  # nearest first
        votes = self.labels[order]  # (B, k)
        counts = torch.zeros(len(votes), self.num_classes, dtype=torch.long).scatter_add_(1, votes, torch.ones_like(votes))
        tied = counts == counts.max(dim=1, keepdim=True).values
        # the first neighbour (in distance order) whose class is among the most voted
        first = tied.gather(1, votes).float().argmax(dim=1)
        return votes.gather(1, first[:, None]).squeeze(1)


@lru_cache(maxsize=1)
def load_digit_judges() -> dict[str, Judge]:
    """The benchmark's judges (module docstring), built once per process: name -> images (B, 3, H, W) -> classes (B,)."""
    from ..assets import BUNDLED_DIGIT_JUDGE
    from ..data.uci_digits import load_digit_images
    from ..rewards.digits import DigitClassifier

    # (from_pretrained leaves torch's global generator alone: loading the judges in a run's first evaluation does not
    # change its random stream)
    cnn = DigitClassifier.from_pretrained(BUNDLED_DIGIT_JUDGE).eval().requires_grad_(False)
    x_train, y_train, _, _ = load_digit_images(seed=0)  # the split the diffusion model and the reward were trained on

    @torch.no_grad()
    def judge_cnn(images: torch.Tensor) -> torch.Tensor:
        return cnn(images.float().cpu()).argmax(dim=-1)

    return {"judge_cnn": judge_cnn, "pixel_knn": PixelNearestNeighbours(x_train, y_train)}


def judged_target_histogram(judge_classes: torch.Tensor | np.ndarray, base_log_rewards, beta: float, num_classes: int = 10) -> np.ndarray:
    """The ideal target's class histogram as a judge sees it: SNIS weights exp(β r) of the reference base samples
    (r from the reward), classes from the judge."""
    return ideal_target_histogram(np.asarray(judge_classes), base_log_rewards, beta, num_classes=num_classes, min_ess=0).hist


__all__ = ["PixelNearestNeighbours", "judged_target_histogram", "load_digit_judges"]
