"""Reference settings per reward, and ``load_reward(name)``.

``REWARD_PRESETS[name]`` holds what an experiment with that reward needs besides the model:

- ``reward_scale`` (β) and ``unet_reg_scale`` (λ) of Nabla-GFlowNet (DESIGN §2, SD 1.5, 50-step DDPM);
- ``prompts``: the named prompt set the reward is evaluated with;
- ``flow_head_uses_prompt``: whether the flow head g_φ sees the prompt embedding (``False`` for
  prompt-free rewards: it then gets a zero embedding);
- ``reward_class``: the class name in :mod:`trl_gfn.rewards`.

Chosen values and why:

- aesthetic: β = 1e4, λ = 2e3 (the reference values).
- hpsv2 / hpsv2.1: β = 5e5, λ = 5e3. The reference range is β 5e5…1e4, λ 5e3…1e2. HPS is a bare cosine:
  differences between samples of one prompt are ≈0.03, against ≈1.5 for the aesthetic score, so
  β = 5e5 gives the same tilt β·Δr ≈ 1.5e4 as the aesthetic preset; with it the top of the λ range
  (5e3, same order as the other rewards' λ) keeps the trust region comparable. Lower both ends together
  (e.g. β = 1e4, λ = 1e2) for a milder fine-tune.
- imagereward: β = 1e4, λ = 5e3 (the reference values).
- pickscore: β = 5e3, λ = 5e3. Not in the reference; PickScore is 100 · cosine of a CLIP-H model
  (logit scale 100), so per unit of cosine β = 5e3 matches the HPSv2 preset (5e5 / 100); its
  per-prompt spread (≈0.5–2) is that of ImageReward, for which λ = 5e3 is the reference.

Where the weights come from: :mod:`trl_gfn.rewards.official` (the authors' own checkpoints, converted and
cached on first use).
"""

from __future__ import annotations

import os
from typing import Any

from .aesthetic import AestheticScorer
from .base import RewardModel
from .clip_scorers import HPSv2Scorer, PickScoreScorer
from .imagereward import ImageRewardScorer

REWARD_CLASSES: dict[str, type[RewardModel]] = {
    "aesthetic": AestheticScorer,
    "hpsv2": HPSv2Scorer,
    "hpsv2.1": HPSv2Scorer,
    "imagereward": ImageRewardScorer,
    "pickscore": PickScoreScorer,
}

REWARD_PRESETS: dict[str, dict[str, Any]] = {
    "aesthetic": {
        "reward_class": "AestheticScorer",
        "reward_scale": 1e4,
        "unet_reg_scale": 2e3,
        "prompts": "simple_animals",
        "flow_head_uses_prompt": False,
    },
    "hpsv2": {
        "reward_class": "HPSv2Scorer",
        "reward_scale": 5e5,
        "unet_reg_scale": 5e3,
        "prompts": "hpdv2",
        "flow_head_uses_prompt": True,
    },
    "hpsv2.1": {
        "reward_class": "HPSv2Scorer",
        "reward_scale": 5e5,
        "unet_reg_scale": 5e3,
        "prompts": "hpdv2",
        "flow_head_uses_prompt": True,
    },
    "imagereward": {
        "reward_class": "ImageRewardScorer",
        "reward_scale": 1e4,
        "unet_reg_scale": 5e3,
        "prompts": "drawbench",
        "flow_head_uses_prompt": True,
    },
    "pickscore": {
        "reward_class": "PickScoreScorer",
        "reward_scale": 5e3,
        "unet_reg_scale": 5e3,
        "prompts": "drawbench",
        "flow_head_uses_prompt": True,
    },
}


def get_reward_preset(name: str) -> dict[str, Any]:
    """A copy of ``REWARD_PRESETS[name]``; ``ValueError`` naming the known rewards otherwise."""
    if name not in REWARD_PRESETS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARD_PRESETS))}")
    return dict(REWARD_PRESETS[name])


def load_reward(name: str, pretrained_model_name_or_path: str | os.PathLike | None = None, *, reward_cache_dir: str | None = None,
                source_dir: str | None = None, cache_dir: str | None = None, local_files_only: bool = False, token: str | bool | None = None,
                **kwargs: Any) -> RewardModel:
    """The reward ``name`` ("aesthetic", "hpsv2", "hpsv2.1", "imagereward", "pickscore"), ready to score.

    Without ``pretrained_model_name_or_path`` the authors' official checkpoint is used: downloaded into the
    Hugging Face cache on first use (``cache_dir``, ``local_files_only``, ``token`` as in ``hf_hub_download``;
    or read from ``source_dir/<owner>/<repo>/<filename>``), converted, and cached under ``reward_cache_dir``
    (default: the HF assets cache, ``~/.cache/huggingface/assets/trl-gfn``); later calls load the cached
    conversion (see :mod:`trl_gfn.rewards.official`). With it, an already converted reward is loaded from that
    directory or Hub id with ``from_pretrained`` (``kwargs`` such as ``revision`` and ``map_location`` go there).
    Raises if any file is missing or incomplete, naming it (never returns a randomly initialised reward).
    """
    get_reward_preset(name)  # names the known rewards if ``name`` is not one
    cls = REWARD_CLASSES[name]
    hub = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    if pretrained_model_name_or_path is not None:
        if reward_cache_dir is not None or source_dir is not None:
            raise ValueError("load_reward: reward_cache_dir and source_dir are for the official checkpoints; they cannot be combined "
                             "with pretrained_model_name_or_path (an already converted reward)")
        return cls.from_pretrained(pretrained_model_name_or_path, **{k: v for k, v in hub.items() if v}, **kwargs)
    from .official import ensure_converted

    folder = ensure_converted(name, reward_cache_dir=reward_cache_dir, source_dir=source_dir, **hub)
    return cls.from_pretrained(folder, **kwargs)
