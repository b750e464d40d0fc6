"""A small CNN digit classifier and the differentiable reward built on it.

Made for the bundled digits model (``trl_gfn.assets.BUNDLED_DIGITS_MODEL``): the classifier is trained
on the same UCI handwritten digits (``scripts/train_digit_classifier.py``) and ships as
``trl_gfn.assets.BUNDLED_DIGIT_CLASSIFIER``.

- :class:`DigitClassifier` maps images in [0, 1] of shape (B, 3, H, W) (any H, W; resized
  differentiably) to 10 logits; :meth:`DigitClassifier.features` gives the penultimate features used
  by the diversity and prior-preservation metrics of :mod:`trl_gfn.evaluation`.
- :class:`DigitClassifierReward` is the same network packaged as a reward:
  ``r(x) = log p(y in S | x)`` for a target set ``S`` of digits, or, with ``prompt_aware=True``, the
  digit named in each prompt (``"a handwritten digit 3"`` -> ``S = {3}``).

Both are Hub-loadable (``huggingface_hub.PyTorchModelHubMixin``) and read the same checkpoint::

    from trl_gfn.assets import BUNDLED_DIGIT_CLASSIFIER
    reward_fn = DigitClassifierReward.from_pretrained(BUNDLED_DIGIT_CLASSIFIER, target_digits=[0, 8])
    rewards, _ = reward_fn(images, prompts, prompt_metadata)
"""

from __future__ import annotations

import numbers
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .base import RewardModel

NUM_DIGITS = 10
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _check_local_weights(path) -> None:
    p = Path(path)
    if p.is_dir() and not (p / "model.safetensors").is_file() and not (p / "pytorch_model.bin").is_file():
        raise FileNotFoundError(
            f"{str(p)!r} holds no classifier weights (model.safetensors); refusing to build a randomly initialised "
            "digit classifier. Train one with scripts/train_digit_classifier.py or use trl_gfn.assets.BUNDLED_DIGIT_CLASSIFIER."
        )


class DigitClassifier(nn.Module, PyTorchModelHubMixin, library_name="trl-gfn", tags=["trl-gfn", "digits", "classifier"]):
    """A small CNN over grey-level digits.

    Input: images in [0, 1], shape (B, 3, H, W) (or (B, 1, H, W)). The channels are averaged to one grey
    channel (the digits are grey; this makes the classifier indifferent to colour casts) and the image
    is resized to ``input_size`` with differentiable bilinear interpolation (antialiased when shrinking)
    when H, W differ from it. Output: (B, 10) logits.

    Architecture: conv3x3(1->w) - conv3x3(w->w) - maxpool - conv3x3(w->2w) - maxpool - conv3x3(2w->2w),
    flattened (2w x input_size/4 x input_size/4) -> linear(feature_dim) [= features] -> dropout ->
    linear(num_classes), with SiLU activations (smooth, so reward gradients are informative everywhere).
    """

    def __init__(self, width: int = 16, feature_dim: int = 64, input_size: int = 16, num_classes: int = NUM_DIGITS, dropout: float = 0.2):
        super().__init__()
        if input_size % 4 != 0:
            raise ValueError(f"input_size must be a multiple of 4, got {input_size}")
        self.input_size = int(input_size)
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        w = int(width)
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
        )
        self.fc = nn.Linear(2 * w * (input_size // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Grey-scale, resize to ``input_size`` and map [0, 1] -> [-1, 1] (all differentiable)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"DigitClassifier expects images of shape (B, 3, H, W) or (B, 1, H, W), got {tuple(images.shape)}")
        x = images.float().mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            shrink = x.shape[-2] > self.input_size or x.shape[-1] > self.input_size
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=shrink)
        return x * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim): the space of the diversity and Fréchet metrics."""
        h = self.conv(self.preprocess(images)).flatten(1)
        return F.silu(self.fc(h))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.dropout(self.features(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """Load trained weights from a local directory or a Hub repo (``PyTorchModelHubMixin.from_pretrained``).

        Keyword arguments override the stored config (for the reward: ``target_digits=...`` or
        ``prompt_aware=True``). Loading is strict (missing or unexpected keys raise) and a local
        directory without weights raises ``FileNotFoundError``: a pretrained classifier is never
        silently replaced by random weights. Building the network draws its (then overwritten) initial weights from torch's
        global generator on a fork of it: loading a classifier leaves a caller's random stream as it was.
        """
        _check_local_weights(pretrained_model_name_or_path)
        kwargs.setdefault("strict", True)  # every parameter must come from the checkpoint
        with torch.random.fork_rng(devices=[]):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def parse_digit(prompt: str) -> int:
    """The digit a prompt names: ``"a handwritten digit 3"`` -> 3 (also ``"... three"``).

    Raises ``ValueError`` when the prompt names no digit (e.g. the generic ``"a handwritten digit"``),
    several different ones, or a number with more than one digit.
    """
    found = set()
    for tok in re.findall(r"[a-z]+|\d+", prompt.lower()):
        if tok.isdigit():
            if len(tok) != 1:
                found.add(tok)
            else:
                found.add(int(tok))
        elif tok in _NUMBER_WORDS:
            found.add(_NUMBER_WORDS.index(tok))
    if len(found) != 1 or not isinstance(next(iter(found)), int):
        what = "no digit" if not found else f"{sorted(map(str, found))}"
        raise ValueError(
            f"prompt-aware DigitClassifierReward: the prompt {prompt!r} names {what}; prompts must name exactly one "
            "digit 0-9 (e.g. 'a handwritten digit 3'), or pass prompt_metadata [{'digit': 3}, ...], or use target_digits=..."
        )
    return found.pop()


class DigitClassifierReward(RewardModel, DigitClassifier):
    """``r(x) = log p(y in S | x)`` from :class:`DigitClassifier`: a differentiable log-reward in (-inf, 0].

    Args:
        target_digits: the target set ``S`` (an int or an iterable of ints in 0..9). ``S = {0..9}`` gives
            ``r = 0`` everywhere.
        prompt_aware: instead of a fixed ``S``, use ``S = {d}`` with ``d`` the digit named in each prompt
            (``prompt_metadata[i]["digit"]`` when given takes precedence); a prompt naming no digit raises
            ``ValueError`` (see :func:`parse_digit`).
        width, feature_dim, input_size, num_classes, dropout: the classifier architecture
            (stored in ``config.json`` by ``save_pretrained``).

    Exactly one of ``target_digits`` / ``prompt_aware`` must be set. The log-probability is computed as
    ``logsumexp(log_softmax(logits)[S])`` (stable for confident classifiers). Parameters are frozen and
    the module is in eval mode; scoring is float32.

    Loading: ``DigitClassifierReward.from_pretrained(path_or_repo, target_digits=[0, 8])`` reads the same
    checkpoint as ``DigitClassifier.from_pretrained``; a directory without weights raises
    (never random weights).
    """

    def __init__(
        self,
        target_digits: int | Iterable[int] | None = None,
        prompt_aware: bool = False,
        width: int = 16,
        feature_dim: int = 64,
        input_size: int = 16,
        num_classes: int = NUM_DIGITS,
        dropout: float = 0.2,
    ):
        DigitClassifier.__init__(self, width=width, feature_dim=feature_dim, input_size=input_size, num_classes=num_classes, dropout=dropout)
        if (target_digits is None) == (not prompt_aware):
            raise ValueError(
                "DigitClassifierReward needs exactly one of `target_digits` (the target set S, e.g. [0, 8]) or "
                f"`prompt_aware=True` (S = the digit named in each prompt); got target_digits={target_digits!r}, prompt_aware={prompt_aware!r}"
            )
        self.prompt_aware = bool(prompt_aware)
        if target_digits is not None:
            digits = [int(target_digits)] if isinstance(target_digits, numbers.Integral) else sorted({int(d) for d in target_digits})
            if not digits or any(d < 0 or d >= num_classes for d in digits):
                raise ValueError(f"target_digits must be a non-empty set of ints in [0, {num_classes - 1}], got {target_digits!r}")
            self.target_digits: list[int] | None = digits
            mask = torch.zeros(num_classes, dtype=torch.bool)
            mask[digits] = True
        else:
            self.target_digits = None
            mask = torch.zeros(num_classes, dtype=torch.bool)
        self.register_buffer("_target_mask", mask, persistent=False)
        # record the normalised target (a list) in the config written by save_pretrained: the Hub mixin
        # drops arguments it cannot serialise (e.g. a range)
        if isinstance(getattr(self, "_hub_mixin_config", None), dict):
            self._hub_mixin_config["target_digits"] = self.target_digits
            self._hub_mixin_config["prompt_aware"] = self.prompt_aware
        self.freeze()

    # RewardModel.forward (the reward contract) wins over DigitClassifier.forward in the MRO; the
    # classifier outputs stay available as .logits(images) / .features(images).
    forward = RewardModel.forward

    def target_mask(self, prompts: Sequence[str], prompt_metadata: Sequence[dict]) -> torch.Tensor:
        """(B, num_classes) boolean mask of the target set of each sample."""
        batch = len(prompts)
        if not self.prompt_aware:
            return self._target_mask.unsqueeze(0).expand(batch, -1)
        digits = []
        for prompt, meta in zip(prompts, prompt_metadata):
            d = meta.get("digit") if isinstance(meta, dict) else None
            digits.append(int(d) if d is not None else parse_digit(prompt))
        idx = torch.tensor(digits, device=self._target_mask.device)
        if (idx < 0).any() or (idx >= self.num_classes).any():
            raise ValueError(f"prompt digits must be in [0, {self.num_classes - 1}], got {digits}")
        return F.one_hot(idx, self.num_classes).bool()

    def log_prob_of_set(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.logits(images), dim=-1)
        return torch.logsumexp(logp.masked_fill(~mask.to(logp.device), float("-inf")), dim=-1)

    def score(self, images: torch.Tensor, prompts: Sequence[str], prompt_metadata: Sequence[dict]) -> torch.Tensor:
        return self.log_prob_of_set(images, self.target_mask(prompts, prompt_metadata))

    def train(self, mode: bool = True):
        # a reward is a fixed target: keep dropout off even if a trainer calls .train() on everything
        return super().train(False)


__all__ = ["DigitClassifier", "DigitClassifierReward", "parse_digit", "NUM_DIGITS"]
