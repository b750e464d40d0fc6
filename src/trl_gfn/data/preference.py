"""Preference pairs in the Pick-a-Pic v2 layout: checked once, then loaded as pixel tensors batch by batch.

A dataset (``datasets.Dataset``) has the columns ``caption``; ``jpg_0``, ``jpg_1`` (encoded image bytes, a
``datasets.Image`` feature, or a ``{"bytes", "path"}`` dict); ``label_0`` (1.0: the first image is preferred, 0.0: the
second, 0.5: a tie; any value in [0, 1] is the probability that the first is preferred); optionally ``user_id`` (or
``annotator_id``): who labelled the pair. Other columns are ignored.

:class:`PreferencePairs` checks every row before training starts (captions and labels always, images when
``verify_images``): a bad row raises :class:`PreferenceDataError` naming the dataset, row and column, or, with
``invalid_rows="skip"``, is left out and counted. Ties (0 < label_0 < 1) are dropped (Diffusion-DPO's practice on
Pick-a-Pic) or kept as soft labels. Images are resized (shorter side) and center-cropped to the model's resolution,
optionally flipped at random, and mapped to [-1, 1] (what the VAE encodes).
"""

from __future__ import annotations

import io
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
#: annotator columns, in order of precedence (Pick-a-Pic names it ``user_id``)
ANNOTATOR_COLUMNS = ("user_id", "annotator_id")
#: how many bad rows a skip warning lists
SHOWN_PROBLEMS = 5


class PreferenceDataError(ValueError):
    """A preference dataset that cannot be trained on as given; the message names the dataset, row and column."""


@dataclass
class PairBatch:
    """A batch of preference pairs ready for the VAE: the preferred image first.

    ``winners`` / ``losers``: (B, 3, R, R) in [-1, 1]; ``labels``: (B,) probability that the winner is preferred
    (1 for a hard label, 0.5 for a tie kept as a soft label); ``rows``: the dataset rows; ``user_ids``: the annotator
    of each pair (None without an annotator column).
    """

    captions: list[str]
    winners: torch.Tensor
    losers: torch.Tensor
    labels: torch.Tensor
    rows: list[int]
    user_ids: list[Any]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class DataReport:
    """What the check of a dataset found: rows in, pairs kept, ties dropped, bad rows skipped (with the first reasons)."""

    rows: int = 0
    pairs: int = 0
    ties_dropped: int = 0
    invalid_skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def as_log(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/rows": self.rows, f"{prefix}/pairs": self.pairs, f"{prefix}/ties_dropped": self.ties_dropped,
                f"{prefix}/invalid_skipped": self.invalid_skipped}


def decode_image(value: Any, where: str):
    """A PIL RGB image from encoded bytes, a PIL image, or a ``{"bytes", "path"}`` dict; errors name ``where``."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        image = value
    else:
        data, path = None, None
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, dict) and ("bytes" in value or "path" in value):
            data, path = value.get("bytes"), value.get("path")
        else:
            raise PreferenceDataError(f"{where}: expected encoded image bytes, a datasets.Image value or a PIL image, got {type(value).__name__}")
        if data is None and not path:
            raise PreferenceDataError(f"{where}: the image is missing (no bytes and no path)")
        try:
            image = Image.open(io.BytesIO(data)) if data is not None else Image.open(os.fspath(path))
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise PreferenceDataError(f"{where}: cannot decode the image ({type(err).__name__}: {err})") from err
    if min(image.size) < 1:
        raise PreferenceDataError(f"{where}: the image is empty ({image.size[0]}x{image.size[1]})")
    return image.convert("RGB")


def preprocess_image(image, resolution: int, flip: bool) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` (bicubic with antialiasing), center-crop, optionally flip; (3, R, R) in [-1, 1]."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.BICUBIC, reducing_gap=None)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    if flip:
        pixels = pixels.flip(-1)
    return pixels * 2.0 - 1.0


def _label_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"expected a number in [0, 1], got {value!r}"
    if not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
        return f"must be in [0, 1] (1 = jpg_0 preferred, 0 = jpg_1, 0.5 = tie), got {value!r}"
    return None


#: above this many rows the up-front image check warns about its cost
VERIFY_IMAGES_WARN_ROWS = 50_000


class PreferencePairs:
    """A checked view of a preference dataset: the rows that train, which image of each is preferred, and loading.

    Args:
        dataset: a ``datasets.Dataset`` in the Pick-a-Pic v2 layout (see the module docstring).
        resolution: side of the square images fed to the VAE (the model's resolution).
        random_flip: flip each image horizontally with probability 1/2 (decided by the generator of :meth:`load`).
        tie_handling: ``"drop"`` pairs with 0 < label_0 < 1 (counted), or ``"soft"``: keep them with the label as the
            probability that the preferred image wins.
        invalid_rows: ``"error"``: raise on the first bad row (naming row and column); ``"skip"``: leave bad rows out,
            count them and warn once with the first few reasons.
        verify_images: decode every image during the check (else images are decoded when their batch is loaded, and
            a bad one then raises whatever ``invalid_rows`` says, since a batch cannot be shrunk mid-training).
        name: how errors name the dataset (``train_dataset``, ``eval_dataset``).
    """

    def __init__(self, dataset, *, resolution: int, random_flip: bool = False, tie_handling: str = "drop", invalid_rows: str = "error",
                 verify_images: bool = True, name: str = "train_dataset") -> None:
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"{name}: expected a datasets.Dataset in the Pick-a-Pic layout, got {type(dataset).__name__}"
                            + (" (pick a split, e.g. dataset['train'])" if isinstance(dataset, datasets.DatasetDict) else ""))
        if tie_handling not in ("drop", "soft"):
            raise ValueError(f"tie_handling must be 'drop' or 'soft', got {tie_handling!r}")
        if invalid_rows not in ("error", "skip"):
            raise ValueError(f"invalid_rows must be 'error' or 'skip', got {invalid_rows!r}")
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise PreferenceDataError(f"{name}: missing column(s) {missing}; a preference dataset needs {list(REQUIRED_COLUMNS)} "
                                      f"(Pick-a-Pic v2 layout), it has {dataset.column_names}")
        self.name, self.resolution, self.random_flip = name, int(resolution), bool(random_flip)
        self.tie_handling, self.invalid_rows, self.verify_images = tie_handling, invalid_rows, bool(verify_images)
        self.annotator_column = next((c for c in ANNOTATOR_COLUMNS if c in dataset.column_names), None)
        self.dataset = _undecoded(dataset)
        self.report = DataReport(rows=len(dataset))
        #: kept dataset rows, whether jpg_0 is the preferred image, and the probability that the preferred image wins
        self.rows: list[int] = []
        self.first_preferred: list[bool] = []
        self.labels: list[float] = []
        self._check()

    # ------------------------------------------------------------------ the check
    def _check(self) -> None:
        ds = self.dataset
        if self.verify_images and len(ds) > VERIFY_IMAGES_WARN_ROWS:
            warnings.warn(f"{self.name}: verify_images=True decodes all {2 * len(ds)} images before training, on every process and at "
                          "every resume (hours for a dataset of this size); verify_images=False decodes each when its batch loads",
                          UserWarning, stacklevel=3)
        captions = list(ds["caption"])
        labels = list(ds["label_0"])
        for row, (caption, label) in enumerate(zip(captions, labels)):
            problem = None
            if not isinstance(caption, str) or not caption.strip():
                problem = ("caption", f"expected a non-empty string, got {caption!r}")
            elif (why := _label_problem(label)) is not None:
                problem = ("label_0", why)
            elif self.verify_images:
                problem = self._image_problem(row)
            if problem is not None:
                self._bad_row(row, *problem)
                continue
            label = float(label)
            if 0.0 < label < 1.0 and self.tie_handling == "drop":
                self.report.ties_dropped += 1
                continue
            self.rows.append(row)
            self.first_preferred.append(label >= 0.5)
            self.labels.append(max(label, 1.0 - label))
        self.report.pairs = len(self.rows)
        if self.report.invalid_skipped:
            shown = "; ".join(self.report.problems)
            more = self.report.invalid_skipped - len(self.report.problems)
            warnings.warn(f"{self.name}: skipped {self.report.invalid_skipped} invalid row(s) of {self.report.rows} (invalid_rows='skip'): "
                          f"{shown}{f'; and {more} more' if more > 0 else ''}", UserWarning, stacklevel=3)
        if not self.rows:
            raise PreferenceDataError(f"{self.name}: no preference pair left to train on ({self.report.rows} rows, {self.report.ties_dropped} "
                                      f"ties dropped, {self.report.invalid_skipped} invalid rows skipped)")

    def _image_problem(self, row: int) -> tuple[str, str] | None:
        record = self.dataset[row]
        for column in IMAGE_COLUMNS:
            try:
                decode_image(record[column], f"{self.name} row {row}, column {column!r}")
            except PreferenceDataError as err:
                return column, str(err).split(": ", 1)[1]
        return None

    def _bad_row(self, row: int, column: str, why: str) -> None:
        message = f"{self.name} row {row}, column {column!r}: {why}"
        if self.invalid_rows == "error":
            raise PreferenceDataError(message + " (set invalid_rows='skip' to leave such rows out)")
        self.report.invalid_skipped += 1
        if len(self.report.problems) < SHOWN_PROBLEMS:
            self.report.problems.append(f"row {row}, column {column!r}: {why}")

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.rows)

    def user_id(self, index: int) -> Any:
        """The annotator of kept pair ``index`` (None without a ``user_id`` / ``annotator_id`` column)."""
        return self.dataset[self.rows[index]][self.annotator_column] if self.annotator_column else None

    def load(self, indices: Sequence[int], generators: Sequence[torch.Generator] | None = None, flip: bool = True) -> PairBatch:
        """The kept pairs ``indices`` (positions in :attr:`rows`) as a :class:`PairBatch`, preferred image first.

        With ``random_flip`` each image is flipped when a draw from its pair's generator (two draws per pair, winner
        then loser) is below 1/2, so that a pair's flips depend on its generator only. ``flip=False`` loads the images as
        stored whatever ``random_flip`` says (pairs that are read, not trained on: e.g. PPD's context pairs).
        """
        flip = flip and self.random_flip
        if flip and (generators is None or len(generators) != len(indices)):
            raise ValueError("random_flip needs one generator per pair")
        captions, winners, losers, user_ids, rows = [], [], [], [], []
        for n, i in enumerate(indices):
            row = self.rows[i]
            record = self.dataset[row]
            images = [decode_image(record[c], f"{self.name} row {row}, column {c!r}") for c in IMAGE_COLUMNS]
            if not self.first_preferred[i]:
                images.reverse()
            flips = torch.rand(2, generator=generators[n]).lt(0.5).tolist() if flip else [False, False]
            winners.append(preprocess_image(images[0], self.resolution, flips[0]))
            losers.append(preprocess_image(images[1], self.resolution, flips[1]))
            captions.append(record["caption"])
            user_ids.append(record[self.annotator_column] if self.annotator_column else None)
            rows.append(row)
        labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.float32)
        return PairBatch(captions=captions, winners=torch.stack(winners), losers=torch.stack(losers), labels=labels, rows=rows,
                         user_ids=user_ids)

    def captions(self, n: int) -> list[str]:
        """The first ``n`` distinct captions of the kept pairs (for model cards)."""
        seen: list[str] = []
        for row in self.rows:
            caption = self.dataset[row]["caption"]
            if caption not in seen:
                seen.append(caption)
            if len(seen) >= n:
                break
        return seen


def _undecoded(dataset):
    """``dataset`` with its ``datasets.Image`` columns left encoded, so that a bad image is reported, not raised mid-access."""
    from datasets import Image

    for column in IMAGE_COLUMNS:
        feature = dataset.features.get(column)
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(column, Image(decode=False))
    return dataset


__all__ = ["ANNOTATOR_COLUMNS", "DataReport", "PairBatch", "PreferenceDataError", "PreferencePairs", "REQUIRED_COLUMNS", "decode_image",
           "preprocess_image"]
