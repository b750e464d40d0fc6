"""Reference settings per reward, and ``load_reward(name)`` for the example scripts.

``REWARD_PRESETS[name]`` holds what an experiment with that reward needs besides the model:

- ``reward_scale`` (β) and ``unet_reg_scale`` (λ) of Nabla-GFlowNet (DESIGN §2, SD 1.5, 50-step DDPM);
- ``prompts``: the named prompt set the reward is evaluated with;
- ``flow_head_uses_prompt``: whether the flow head g_φ sees the prompt embedding (``False`` for
  prompt-free rewards: it then gets a zero embedding);
- ``pretrained_model_name_or_path``: the default Hub id of the converted reward;
- ``reward_class``: the class name in :mod:`trl_gfn.rewards`.

Chosen values and why:

- aesthetic: β = 1e4, λ = 2e3 (the reference values).
- hpsv2: β = 5e5, λ = 5e3. The reference range is β 5e5…1e4, λ 5e3…1e2. HPS is a bare cosine:
  differences between samples of one prompt are ≈0.03, against ≈1.5 for the aesthetic score, so
  β = 5e5 gives the same tilt β·Δr ≈ 1.5e4 as the aesthetic preset; with it the top of the λ range
  (5e3, same order as the other rewards' λ) keeps the trust region comparable. Lower both ends together
  (e.g. β = 1e4, λ = 1e2) for a milder fine-tune.
- imagereward: β = 1e4, λ = 5e3 (the reference values).
- pickscore: β = 5e3, λ = 5e3. Not in the reference; PickScore is 100 · cosine of a CLIP-H model
  (logit scale 100), so per unit of cosine β = 5e3 matches the HPSv2 preset (5e5 / 100); its
  per-prompt spread (≈0.5–2) is that of ImageReward, for which λ = 5e3 is the reference.

The Hub ids are where the converted rewards are published; until they are, make the directories
with ``trl-gfn-convert-reward`` from the official files and pass them as ``pretrained_model_name_or_path``.
"""

from __future__ import annotations

from typing import Any

from .aesthetic import AestheticScorer
from .base import RewardModel
from .clip_scorers import HPSv2Scorer, PickScoreScorer
from .imagereward import ImageRewardScorer

AESTHETIC_HUB_ID = "trl-gfn/aesthetic-v2-clip-l14"
HPSV2_HUB_ID = "trl-gfn/hpsv2.1-clip-h14"
IMAGEREWARD_HUB_ID = "trl-gfn/imagereward-v1.0"
PICKSCORE_HUB_ID = "trl-gfn/pickscore-v1-clip-h14"

REWARD_CLASSES: dict[str, type[RewardModel]] = {
    "aesthetic": AestheticScorer,
    "hpsv2": HPSv2Scorer,
    "imagereward": ImageRewardScorer,
    "pickscore": PickScoreScorer,
}

REWARD_PRESETS: dict[str, dict[str, Any]] = {
    "aesthetic": {
        "reward_class": "AestheticScorer",
        "pretrained_model_name_or_path": AESTHETIC_HUB_ID,
        "reward_scale": 1e4,
        "unet_reg_scale": 2e3,
        "prompts": "simple_animals",
        "flow_head_uses_prompt": False,
    },
    "hpsv2": {
        "reward_class": "HPSv2Scorer",
        "pretrained_model_name_or_path": HPSV2_HUB_ID,
        "reward_scale": 5e5,
        "unet_reg_scale": 5e3,
        "prompts": "hpdv2",
        "flow_head_uses_prompt": True,
    },
    "imagereward": {
        "reward_class": "ImageRewardScorer",
        "pretrained_model_name_or_path": IMAGEREWARD_HUB_ID,
        "reward_scale": 1e4,
        "unet_reg_scale": 5e3,
        "prompts": "drawbench",
        "flow_head_uses_prompt": True,
    },
    "pickscore": {
        "reward_class": "PickScoreScorer",
        "pretrained_model_name_or_path": PICKSCORE_HUB_ID,
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


def load_reward(name: str, pretrained_model_name_or_path: str | None = None, **kwargs: Any) -> RewardModel:
    """Load the reward ``name`` ("aesthetic", "hpsv2", "imagereward", "pickscore") from a Hub id or directory.

    ``pretrained_model_name_or_path`` defaults to the preset's Hub id; ``kwargs`` go to ``from_pretrained``
    (``revision``, ``cache_dir``, ``local_files_only``, ``map_location``, ``token`` ...). Raises if the
    weights, config or tokenizer are missing (never returns a randomly initialised reward).
    """
    preset = get_reward_preset(name)
    cls = REWARD_CLASSES[name]
    path = pretrained_model_name_or_path or preset["pretrained_model_name_or_path"]
    return cls.from_pretrained(path, **kwargs)
