"""Exponential moving averages of the LoRA parameters, swapped into the UNet for a forward pass when needed.

Adaptive-DPO judges each pair with the current model and with EMA copies of it (decays 0.9999 and 0.5); keeping the
copies as shadow tensors of the LoRA parameters (not as extra UNets) costs a few LoRA-sized buffers. They are saved in
checkpoints as safetensors (``ema_lora.safetensors``), so that a resumed run continues with the same averages.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch

EMA_FILE = "ema_lora.safetensors"


class LoraEMA:
    """EMA shadows ``ema_k ← d_k·ema_k + (1 − d_k)·θ`` of a list of named parameters, one shadow per decay ``d_k``.

    The shadows start equal to the parameters (a fresh LoRA: the reference model). :meth:`swapped` puts shadow ``k``
    into the parameters for the duration of a ``with`` block (use it without gradient) and restores them after.
    """

    def __init__(self, named_parameters: Sequence[tuple[str, torch.nn.Parameter]], decays: Sequence[float]) -> None:
        if not decays or any(not 0.0 <= float(d) < 1.0 for d in decays):
            raise ValueError(f"EMA decays must be in [0, 1), got {list(decays)}")
        self.names = [n for n, _ in named_parameters]
        self.params = [p for _, p in named_parameters]
        self.decays = [float(d) for d in decays]
        self.shadows = [[p.detach().clone().float() for p in self.params] for _ in self.decays]

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step of every shadow towards the current parameters."""
        for decay, shadow in zip(self.decays, self.shadows):
            for s, p in zip(shadow, self.params):
                s.mul_(decay).add_(p.detach().float(), alpha=1.0 - decay)

    @contextlib.contextmanager
    def swapped(self, k: int) -> Iterator[None]:
        """The parameters hold shadow ``k`` inside the block (restored on exit, also on error)."""
        backup = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, s in zip(self.params, self.shadows[k]):
                    p.copy_(s.to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema{k}.{name}": s.detach().cpu().contiguous() for k, shadow in enumerate(self.shadows) for name, s in zip(self.names, shadow)}

    def save(self, directory: str) -> str:
        from safetensors.torch import save_file

        path = os.path.join(directory, EMA_FILE)
        save_file(self.state_dict(), path, metadata={"decays": ",".join(repr(d) for d in self.decays)})
        return path

    def load(self, directory: str) -> None:
        """Restore the shadows from :meth:`save`'s file; a missing file, another set of decays or other keys raise naming the file."""
        from safetensors import safe_open

        from ..weights_io import read_safetensors

        path = os.path.join(directory, EMA_FILE)
        state = read_safetensors(path, what="EMA copies of the LoRA")
        with safe_open(path, framework="pt") as f:
            decays = (f.metadata() or {}).get("decays", "")
        if decays != ",".join(repr(d) for d in self.decays):
            raise ValueError(f"{path}: holds EMA copies with decays [{decays}], this run uses {self.decays}")
        expected = self.state_dict()
        if sorted(state) != sorted(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise ValueError(f"{path}: its tensors do not match this LoRA's parameters (other rank or target modules?)")
        for k, shadow in enumerate(self.shadows):
            for i, name in enumerate(self.names):
                shadow[i] = state[f"ema{k}.{name}"].to(device=self.params[i].device, dtype=torch.float32)


__all__ = ["EMA_FILE", "LoraEMA"]
