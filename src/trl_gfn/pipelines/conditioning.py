"""Per-sample prompt conditioning richer than one tensor of token embeddings (pooled embeddings, size ids...).

SD 1.x/2.x conditions its UNet on the text encoder's token states alone, and the pipeline carries them as a plain
``(B, L, D)`` tensor. Other families need more per sample: SDXL adds a pooled text embedding and the six
``add_time_ids`` (``added_cond_kwargs``), SD3 a pooled projection. :class:`Conditioning` holds the token states and
those extra tensors together, one row per sample, and answers the row operations the trainers apply to prompt
embeddings (indexing, ``expand``, ``repeat``, ``repeat_interleave``, ``torch.cat``, ``to``), so that a trainer moves
it around exactly as it moves a tensor and never looks inside. Only the model family (``pipelines.families``)
reads its fields, when it calls the denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Conditioning:
    """Token embeddings plus named extra conditioning tensors, all with the samples along dimension 0.

    Attributes:
        embeds: (B, L, D) token states the denoiser attends to (``encoder_hidden_states``); a flow head conditioned on
            the prompt attends to these too.
        added: extra per-sample tensors, each (B, ...): for SDXL ``text_embeds`` (B, P), the pooled embedding of the
            second text encoder, and ``time_ids`` (B, 6), (original size, crop top-left, target size).
    """

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        for name, value in self.added.items():
            if value.shape[0] != self.embeds.shape[0]:
                raise ValueError(f"Conditioning: added[{name!r}] has {value.shape[0]} rows, embeds {self.embeds.shape[0]}")

    # ------------------------------------------------------------------ tensor-like surface (rows only)
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """A new :class:`Conditioning` with ``fn`` applied to every tensor (``fn`` must keep rows aligned)."""
        return Conditioning(fn(self.embeds), {k: fn(v) for k, v in self.added.items()})

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, index: Any) -> Conditioning:
        """The rows at ``index`` (a slice, an index tensor or list, a boolean mask) of every tensor."""
        if isinstance(index, tuple):
            raise IndexError("Conditioning supports row indexing only (one index along the sample dimension)")
        if isinstance(index, torch.Tensor):
            return self.map(lambda v: v[index.to(v.device)])
        return self.map(lambda v: v[index])

    @property
    def shape(self) -> torch.Size:
        """The shape of :attr:`embeds` (rows first)."""
        return self.embeds.shape

    @property
    def device(self) -> torch.device:
        """Device of :attr:`embeds`."""
        return self.embeds.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of :attr:`embeds`."""
        return self.embeds.dtype

    def expand(self, rows: int, *rest: int) -> Conditioning:
        """Broadcast a one-row conditioning to ``rows`` rows (the trailing sizes must be -1 or unchanged)."""
        if any(r != -1 and r != s for r, s in zip(rest, self.embeds.shape[1:])):
            raise ValueError(f"Conditioning.expand changes rows only, got trailing sizes {rest}")
        return self.map(lambda v: v.expand(rows, *v.shape[1:]))

    def repeat(self, rows: int, *rest: int) -> Conditioning:
        """Tile the rows ``rows`` times (the trailing repeat counts must be 1)."""
        if any(r != 1 for r in rest):
            raise ValueError(f"Conditioning.repeat repeats rows only, got trailing counts {rest}")
        return self.map(lambda v: v.repeat(rows, *([1] * (v.dim() - 1))))

    def repeat_interleave(self, repeats: int, dim: int = 0) -> Conditioning:
        """Repeat each row ``repeats`` times in place (rows only)."""
        if dim != 0:
            raise ValueError("Conditioning.repeat_interleave works along the sample dimension (dim=0) only")
        return self.map(lambda v: v.repeat_interleave(repeats, 0))

    def to(self, *args, **kwargs) -> Conditioning:
        """``Tensor.to`` on every tensor (device and/or dtype)."""
        return self.map(lambda v: v.to(*args, **kwargs))

    def float(self) -> Conditioning:
        """Every tensor as float32."""
        return self.map(lambda v: v.float())

    def detach(self) -> Conditioning:
        """Every tensor detached from the graph."""
        return self.map(lambda v: v.detach())

    @staticmethod
    def concatenate(parts: list[Conditioning]) -> Conditioning:
        """Rows of ``parts`` one after the other (every part must carry the same ``added`` keys)."""
        keys = set(parts[0].added)
        if any(set(p.added) != keys for p in parts):
            raise ValueError("cannot concatenate Conditioning objects with different added keys")
        return Conditioning(torch.cat([p.embeds for p in parts]), {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``torch.cat`` along dimension 0 of a list of :class:`Conditioning` (the only torch function it supports)."""
        kwargs = kwargs or {}
        if func is torch.cat:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim != 0:
                raise ValueError("torch.cat of Conditioning objects works along dim=0 only")
            return cls.concatenate(list(args[0]))
        return NotImplemented


#: name of the extra conditioning tokens (e.g. PPD's user tokens) where a family routes them beside the prompt instead of
#: appending them to its token states: the key of :attr:`Conditioning.added` and of the SD3 transformer's
#: ``joint_attention_kwargs`` (which diffusers passes on to the attention processors; ``trl_gfn.models.user_attention``'s
#: ``JointUserAttnProcessor`` takes an ``extra_tokens`` argument)
EXTRA_TOKENS = "extra_tokens"


def append_tokens(conditioning: torch.Tensor | Conditioning, tokens: torch.Tensor) -> torch.Tensor | Conditioning:
    """``tokens`` (B, T, D) appended to the token states of ``conditioning`` (a tensor, or a :class:`Conditioning`'s ``embeds``;
    its extra tensors are kept): how extra conditioning tokens (e.g. PPD's user tokens) travel with any family's prompt."""
    if isinstance(conditioning, Conditioning):
        return Conditioning(torch.cat([conditioning.embeds, tokens.to(conditioning.embeds.dtype)], dim=1), dict(conditioning.added))
    return torch.cat([conditioning, tokens.to(conditioning.dtype)], dim=1)
