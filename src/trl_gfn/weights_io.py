"""Read trained weights without running code from the file and without accepting damaged values.

Checkpoints and saved LoRAs are safetensors files: reading one never unpickles anything. A file that
is missing, truncated or not safetensors, or whose tensors hold NaN/inf, raises an error that names
the file, instead of a bare ``SafetensorError`` or weights that fail later in an unrelated place.
"""

from __future__ import annotations

import hashlib
import os

import torch


class WeightsFileError(ValueError):
    """A weights file that cannot be used; the message names the file and why."""


def read_safetensors(path: str | os.PathLike, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (on the CPU), checked to be finite.

    Raises ``FileNotFoundError`` if it does not exist and :class:`WeightsFileError` if it cannot be
    parsed or holds non-finite values; ``what`` says what the file is in the message.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file {path}")
    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsFileError(f"{what}: {path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsFileError(f"{what}: {path} holds non-finite values (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[:3]}; "
                               "refusing to load weights that would make every later loss non-finite")
    return state


__all__ = ["WeightsFileError", "read_safetensors"]


def sha256_of_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes (read in 1 MiB blocks): how checkpoints and downloaded reward
    checkpoints prove that a file is the one that was written or published."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
