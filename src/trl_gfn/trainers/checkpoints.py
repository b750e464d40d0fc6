"""Crash-safe checkpoints that run no code when loaded.

Layout: ``<run>/checkpoints/checkpoint_<epoch>/`` after ``<epoch>`` complete epochs, and for the offline trainers'
``save_steps`` also ``checkpoint_<epoch>_step_<global step>/`` inside epoch ``<epoch>`` (0-based: that many epochs complete,
and some of the next one's updates). A checkpoint is written into a hidden ``.<name>.partial`` folder (accelerate's optimizer/RNG/scaler files, the trained weights as
safetensors), then the manifest ``trl_gfn_checkpoint.json`` is written last, and the folder is renamed
into place. So a folder named ``checkpoint_N`` is complete whatever moment the process was killed at;
a leftover partial folder is never resumed from and is removed by the next save.

The manifest holds the trainer's counters and per-method state as JSON (nothing of the trainer's own is
pickled), the config (credentials redacted), and the size and SHA-256 of every other file, so that a
missing, truncated or altered file is reported by name before anything is loaded. Weights are read with
safetensors, accelerate's files with ``torch.load(weights_only=True)``: loading a checkpoint never
executes code from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import warnings
from collections import Counter
from typing import Any

from ..weights_io import sha256_of_file

MANIFEST = "trl_gfn_checkpoint.json"
FORMAT = "trl-gfn-checkpoint"
VERSION = 1
#: ``checkpoint_<epoch>`` (an epoch boundary) or ``checkpoint_<epoch>_step_<global step>`` (inside epoch ``<epoch>``)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)(?:_step_(\d+))?$")
#: manifest key holding the SHA-256 of the rest of the manifest (canonical JSON)
SELF_DIGEST = "manifest_sha256"
#: fault injection for the crash tests: ``TRL_GFN_CRASH_AT=<point>[@<n>]`` kills the process the n-th time it reaches <point>
CRASH_ENV = "TRL_GFN_CRASH_AT"

_crash_hits: Counter = Counter()


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, damaged, or of another trainer or setting; the message names the file or setting."""


class TrainingState:
    """The counters a checkpoint restores (kept in the manifest as JSON)."""

    def __init__(self) -> None:
        #: complete epochs
        self.epoch = 0
        #: optimizer updates so far
        self.global_step = 0
        #: optimizer updates already made inside epoch ``epoch`` (0 at an epoch boundary; > 0 only in a ``save_steps`` checkpoint)
        self.epoch_updates = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "global_step": self.global_step, "epoch_updates": self.epoch_updates}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.epoch_updates = int(state.get("epoch_updates", 0))  # (checkpoints written before save_steps have none)


def checkpoint_name(state: TrainingState) -> str:
    """``checkpoint_<epoch>`` at an epoch boundary, ``checkpoint_<epoch>_step_<global step>`` inside an epoch."""
    return f"checkpoint_{state.epoch}" if state.epoch_updates == 0 else f"checkpoint_{state.epoch}_step_{state.global_step}"


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """Sort key of a checkpoint folder name (older first), None if ``name`` is not one: an epoch boundary comes before
    the checkpoints inside that epoch, which come in the order of their global steps."""
    m = CHECKPOINT_PATTERN.match(name)
    if m is None:
        return None
    return int(m.group(1)), -1 if m.group(2) is None else int(m.group(2))


def _checkpoints_in(folder: str) -> list[tuple[tuple[int, int], str]]:
    """``(order, name)`` of every checkpoint folder name in ``folder``, oldest first."""
    return sorted((key, d) for d in os.listdir(folder) if (key := checkpoint_order(d)) is not None)


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when ``TRL_GFN_CRASH_AT`` names ``name`` (used by the crash/resume tests only).

    Points: ``sample`` (after each sampled batch), ``optimizer_step`` (after each update), ``save:weights`` (inside
    ``accelerator.save_state``, LoRA written), ``save:files`` (all files written, no manifest), ``save:manifest``
    (manifest written, folder not renamed), ``save:published`` (renamed, older ones not pruned), ``save:prune``.
    """
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    target, _, count = spec.partition("@")
    if target != name:
        return
    _crash_hits[name] += 1
    if _crash_hits[name] == int(count or 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


# ---------------------------------------------------------------------------------------------- writing
def partial_path(folder: str, name: str) -> str:
    """Where checkpoint ``name`` (see :func:`checkpoint_name`) is written before it is complete."""
    return os.path.join(folder, f".{name}.partial")


def write_manifest(directory: str, info: dict[str, Any]) -> None:
    """Hash every file of ``directory``, flush them to disk and write the manifest (``info`` + the file list) last."""
    files = {}
    for rel in _list_files(directory):
        path = os.path.join(directory, rel)
        _fsync(path)
        files[rel] = {"size": os.path.getsize(path), "sha256": sha256_of_file(path)}
    manifest = {"format": FORMAT, "version": VERSION, **info, "files": files}
    manifest[SELF_DIGEST] = _content_digest(manifest)  # the manifest's own content: a flipped byte in it is caught too
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))
    _fsync_dir(directory)


def publish(partial: str, final: str) -> None:
    """Rename the complete ``partial`` folder to ``final``, replacing an older folder of that name."""
    old = None
    if os.path.exists(final):
        old = _trash_name(final)
        os.replace(final, old)
    os.replace(partial, final)
    _fsync_dir(os.path.dirname(final))
    if old is not None:
        shutil.rmtree(old)


def prune(folder: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints and any leftovers of interrupted saves; returns what was deleted.

    A checkpoint is first renamed to a hidden name, then deleted: a kill mid-way never leaves a partly
    deleted folder under a ``checkpoint_N`` name.
    """
    found = _checkpoints_in(folder)
    deleted = []
    for _, name in found[: max(0, len(found) - keep)]:
        trash = _trash_name(os.path.join(folder, name))
        os.replace(os.path.join(folder, name), trash)
        crash_point("save:prune")
        shutil.rmtree(trash)
        deleted.append(name)
    for name in os.listdir(folder):  # leftovers of killed saves or prunes
        if name.startswith(".checkpoint_") and (name.endswith(".partial") or ".deleting" in name):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    return deleted


def _trash_name(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.deleting-{os.getpid()}")


# ---------------------------------------------------------------------------------------------- reading
def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the checkpoint folder ``path``; :class:`CheckpointError` if absent or malformed."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} is not a complete checkpoint: it has no {MANIFEST} (the save was interrupted, "
                              "or it was written by a trl-gfn version before crash-safe checkpoints)")
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable checkpoint manifest ({err})") from err
    problems = []
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a trl-gfn checkpoint manifest (expected format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{file}: checkpoint format version {manifest.get('version')!r}; this trl-gfn reads version {VERSION}")
    if SELF_DIGEST in manifest:  # (manifests written before the digest was added have none)
        recorded = manifest.pop(SELF_DIGEST)
        if recorded != _content_digest(manifest):
            raise CheckpointError(f"{file}: altered or corrupt: its content does not match the digest it was written with")
    expected = {"trainer": str, "epoch": int, "global_step": int, "num_processes": int, "modules": list, "state": dict, "config": dict,
                "files": dict}
    for key, kind in expected.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            problems.append(f"{key} must be a {kind.__name__}, got {value!r}")
    updates = manifest.get("epoch_updates", 0)  # absent in checkpoints written before save_steps
    if not isinstance(updates, int) or isinstance(updates, bool) or updates < 0:
        problems.append(f"epoch_updates must be an int >= 0, got {updates!r}")
    files = manifest.get("files")
    for rel, entry in files.items() if isinstance(files, dict) else ():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)) or not _safe_relpath(rel):
            problems.append(f"files[{rel!r}] is malformed")
    if problems:
        raise CheckpointError(f"{file}: malformed manifest: " + "; ".join(problems[:5]))
    return manifest


def verify_checkpoint(path: str) -> dict[str, Any]:
    """The manifest of checkpoint ``path`` once every file it lists is present with its recorded size and SHA-256.

    Raises :class:`CheckpointError` naming the first missing, truncated or altered file, or any file the
    manifest does not list (nothing unlisted is ever loaded).
    """
    manifest = read_manifest(path)
    for rel, entry in sorted(manifest["files"].items()):
        file = os.path.join(path, rel)
        if os.path.islink(file) or not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing from the checkpoint (its manifest lists it)")
        size = os.path.getsize(file)
        if size != entry["size"]:
            raise CheckpointError(f"{file}: truncated or altered: {size} bytes, the checkpoint manifest records {entry['size']}")
        if sha256_of_file(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: corrupt: its SHA-256 differs from the one recorded in the checkpoint manifest")
    extra = sorted(set(_list_files(path)) - set(manifest["files"]) - {MANIFEST})
    if extra:
        raise CheckpointError(f"{path}: holds files its manifest does not list: {extra}; a checkpoint is loaded only as it was "
                              "written (remove them)")
    return manifest


def resolve_resume_path(resume_from: str | os.PathLike) -> str:
    """The complete checkpoint to resume from: ``resume_from`` itself if it is a checkpoint folder (``checkpoint_N`` or
    ``checkpoint_N_step_S``), else the newest complete one in ``resume_from/checkpoints`` or ``resume_from``
    (:func:`checkpoint_order`).

    Newer checkpoints that are incomplete or damaged are skipped with a warning saying which and why; a
    ``checkpoint_N`` named explicitly must be complete (:class:`CheckpointError` naming the bad file).
    Raises ``FileNotFoundError`` naming ``resume_from`` when it holds no checkpoint at all.
    """
    if not isinstance(resume_from, (str, os.PathLike)):
        raise TypeError(f"resume_from: expected the path of a run directory or a checkpoint_N directory (or checkpoint_N_step_S), got {resume_from!r}")
    path = os.path.abspath(os.path.expanduser(os.fspath(resume_from)))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume_from: {os.fspath(resume_from)!r} is not a directory")
    if CHECKPOINT_PATTERN.match(os.path.basename(path)):
        verify_checkpoint(path)
        return path
    for candidate in (os.path.join(path, "checkpoints"), path):
        if not os.path.isdir(candidate):
            continue
        found = _checkpoints_in(candidate)[::-1]
        skipped = []
        for _, name in found:
            checkpoint = os.path.join(candidate, name)
            try:
                verify_checkpoint(checkpoint)
            except CheckpointError as err:
                skipped.append(f"{name} ({err})")
                continue
            if skipped:
                warnings.warn(f"resume_from: skipped {len(skipped)} newer checkpoint(s) that cannot be used: {'; '.join(skipped)}. "
                              f"Resuming from {checkpoint}.", UserWarning, stacklevel=2)
            return checkpoint
        if skipped:
            raise CheckpointError(f"resume_from: no complete checkpoint in {candidate}: " + "; ".join(skipped))
    if os.path.isfile(os.path.join(path, "pytorch_lora_weights.safetensors")):
        raise FileNotFoundError(f"resume_from: {os.fspath(resume_from)!r} holds trained weights (a saved model such as <run>/final), not "
                                "checkpoints. To start a new run from these weights set init_from to it; resume_from continues an "
                                "interrupted run from <run>/checkpoints/checkpoint_N (or checkpoint_N_step_S)")
    raise FileNotFoundError(f"resume_from: no checkpoint_N directory (nor checkpoint_N_step_S) in {os.fspath(resume_from)!r} or its checkpoints/ folder")


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignore: set[str]) -> list[str]:
    """``"field: <saved> in the checkpoint, <current> now"`` for every config field that differs (except ``ignore``)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: {a!r} in the checkpoint, {b!r} now")
    return out


# ---------------------------------------------------------------------------------------------- files
def _list_files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            out.append(os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/"))
    return sorted(out)


def _safe_relpath(rel: Any) -> bool:
    return isinstance(rel, str) and bool(rel) and not os.path.isabs(rel) and ".." not in rel.replace("\\", "/").split("/")


def _content_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()



def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["CHECKPOINT_PATTERN", "CheckpointError", "MANIFEST", "TrainingState", "checkpoint_name", "checkpoint_order",
           "config_differences", "crash_point", "partial_path",
           "prune", "publish", "read_manifest", "resolve_resume_path", "verify_checkpoint", "write_manifest"]
