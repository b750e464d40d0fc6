"""The self-play view of a preference dataset: each preferred ("real") image paired with fake samples of a model.

SPIN-Diffusion trains on the preferred image of each pair only. :class:`SelfPlayPairs` turns the n kept pairs of a
:class:`~trl_gfn.data.preference.PreferencePairs` into n·m (real, fake) pairs, m fakes per real image: pair ``p`` is real
image ``p // m`` with fake ``p mod m``. It offers the interface the preference trainer's loop uses (``len``, ``rows``,
``load``, ``report``, ``captions``, ``first_preferred``, ``labels``); the fakes themselves (clean latents) are set by the
trainer at each self-play iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .preference import PairBatch, PreferencePairs


@dataclass
class SelfPlayBatch(PairBatch):
    """A :class:`PairBatch` whose ``winners`` are the real images; ``fake_latents`` (B, C, h, w) are the fakes (``losers`` keeps
    the dataset's other images, unused by the loss)."""

    fake_latents: torch.Tensor | None = None


class SelfPlayPairs:
    """n real images × m fakes each, over the kept pairs of ``pairs`` (see the module docstring)."""

    def __init__(self, pairs: PreferencePairs, samples_per_prompt: int) -> None:
        if samples_per_prompt < 1:
            raise ValueError(f"spin_samples_per_prompt: must be >= 1, got {samples_per_prompt}")
        self.pairs, self.m = pairs, int(samples_per_prompt)
        #: a distinct id per (dataset row, fake index), used to seed each pair's randomness
        self.rows = [row * self.m + j for row in pairs.rows for j in range(self.m)]
        self.first_preferred = [f for f in pairs.first_preferred for _ in range(self.m)]
        self.labels = [1.0] * len(self.rows)
        self.report = pairs.report
        self.fakes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_real(self) -> int:
        return len(self.pairs)

    def real_captions(self) -> list[str]:
        """The caption of every real image, in order (one per kept pair)."""
        captions = self.pairs.dataset["caption"]
        return [captions[row] for row in self.pairs.rows]

    def captions(self, k: int) -> list[str]:
        return self.pairs.captions(k)

    def load(self, indices: Sequence[int], generators: Sequence[torch.Generator] | None = None) -> SelfPlayBatch:
        """Real images of pairs ``indices`` (loaded as the preference pairs load them) with their fakes."""
        if self.fakes is None:
            raise RuntimeError("SelfPlayPairs.load: no fakes yet; the trainer samples them at the start of each self-play iteration")
        batch = self.pairs.load([i // self.m for i in indices], generators)
        return SelfPlayBatch(captions=batch.captions, winners=batch.winners, losers=batch.losers, labels=torch.ones(len(indices)),
                             rows=[self.rows[i] for i in indices], user_ids=batch.user_ids, fake_latents=self.fakes[list(indices)])


__all__ = ["SelfPlayBatch", "SelfPlayPairs"]
