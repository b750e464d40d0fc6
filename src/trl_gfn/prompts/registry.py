"""Named prompt sets shipped with (or loadable by) trl_gfn, and the prompt source the trainers draw from."""

from __future__ import annotations

import random
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Sequence

PromptFunction = Callable[[], tuple[str, dict[str, Any]]]

#: Hub datasets behind the benchmark prompt sets that are too large or not ours to ship.
HUB_PROMPT_SETS = {
    "drawbench": ("sayakpaul/drawbench", "train", "Prompts"),
    "hpdv2": ("ymhao/HPDv2", "test", "prompt"),
}


@lru_cache(maxsize=None)
def _shipped(name: str) -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("assets", f"{name}.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _digits() -> list[str]:
    return ["a handwritten digit"]


def _digits_by_class() -> list[str]:
    return [f"a handwritten digit {d}" for d in range(10)]


def available_prompt_sets() -> list[str]:
    """Names accepted by :func:`load_prompt_set` (``prompt_set`` in the configs)."""
    return ["simple_animals", "handwritten_digit", "handwritten_digits_by_class", *HUB_PROMPT_SETS]


def load_prompt_set(name: str) -> list[str]:
    """The prompts of a named set.

    ``simple_animals`` (45 animal names, the paper's aesthetic-reward prompts) and the digit sets ship
    with the package; ``drawbench`` and ``hpdv2`` are read from the Hub with ``datasets`` (network needed).
    """
    if name == "simple_animals":
        return list(_shipped("simple_animals"))
    if name == "handwritten_digit":
        return _digits()
    if name == "handwritten_digits_by_class":
        return _digits_by_class()
    if name in HUB_PROMPT_SETS:
        repo, split, column = HUB_PROMPT_SETS[name]
        try:
            from datasets import load_dataset

            return list(load_dataset(repo, split=split)[column])
        except Exception as err:  # noqa: BLE001 - re-raised with the set's name and source
            raise RuntimeError(f"prompt set {name!r} is read from the Hub dataset {repo!r} and could not be loaded: {err}") from err
    raise ValueError(f"unknown prompt set {name!r}; available: {available_prompt_sets()}")


class PromptSource:
    """Draws the prompts of an epoch's samples from a callable, a list, a ``datasets.Dataset`` or a named set.

    For lists, datasets and named sets, the prompt of sample ``sample_id`` in ``epoch`` depends only on
    ``(seed, epoch, sample_id)``: the same prompts are drawn for any number of processes. A callable
    ``prompt_fn() -> (prompt, metadata)`` is called once per sample (its randomness is its own).
    """

    def __init__(self, source: PromptFunction | Sequence[str] | Any | str, seed: int = 0):
        self.seed = seed
        self.function: PromptFunction | None = None
        self.prompts: list[str] | None = None
        self.metadata: list[dict] | None = None
        if isinstance(source, str):
            if source not in available_prompt_sets():
                raise ValueError(f"prompts (prompt_function, or config.prompt_set when none is given): {source!r} is not a prompt-set "
                                 f"name (available: {available_prompt_sets()}); a single prompt is a list of one, [{source!r}] "
                                 f"(on the command line: --prompts '{source}|')")
            self.prompts = load_prompt_set(source)
        elif _is_dataset(source):
            if "prompt" not in source.column_names:
                raise ValueError(f"prompt dataset must have a `prompt` column, got columns {source.column_names}")
            self.prompts = list(source["prompt"])
            others = [c for c in source.column_names if c != "prompt"]
            self.metadata = [{c: source[i][c] for c in others} for i in range(len(source))] if others else None
        elif callable(source):
            self.function = source
        elif isinstance(source, Sequence) and all(isinstance(p, str) for p in source):
            self.prompts = list(source)
        else:
            raise TypeError(f"prompts must be a callable, a list of strings, a datasets.Dataset or a prompt-set name, got {type(source).__name__}")
        if self.prompts is not None and not self.prompts:
            raise ValueError("the prompt source is empty")

    def __call__(self, sample_ids: Sequence[int], epoch: int) -> tuple[list[str], list[dict]]:
        prompts, metadata = [], []
        for sid in sample_ids:
            if self.function is not None:
                out = self.function()
                expected = "prompt_function must return (prompt: str, metadata: dict or None)"
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise ValueError(f"{expected}, got {out!r}")
                if not isinstance(out[0], str):
                    raise ValueError(f"{expected}, got a prompt of type {type(out[0]).__name__}: {out[0]!r}")
                if not (out[1] is None or isinstance(out[1], dict)):
                    raise ValueError(f"{expected}, got metadata of type {type(out[1]).__name__}: {out[1]!r}")
                prompts.append(out[0])
                metadata.append(dict(out[1] or {}))
            else:
                index = random.Random(hash((self.seed, epoch, int(sid)))).randrange(len(self.prompts))
                prompts.append(self.prompts[index])
                metadata.append(dict(self.metadata[index]) if self.metadata else {})
        return prompts, metadata


def _is_dataset(obj: Any) -> bool:
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(obj, Dataset)
