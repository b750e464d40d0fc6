"""Reward models with the trl-gfn reward contract, differentiable w.r.t. the images and Hub-loadable.

``reward_fn(images, prompts, prompt_metadata) -> (rewards, reward_metadata)``; see :mod:`.base`.
"""

from .aesthetic import AestheticScorer
from .base import RewardFunction, RewardModel, RewardOutput, check_images, validate_rewards
from .clip_scorers import CLIPPreferenceScorer, HPSv2Scorer, PickScoreScorer
from .composite import CallableReward, CompositeReward
from .compressibility import JpegCompressibilityReward
from .heads import AffineMLPHead
from .hub import PretrainedRewardModel
from .imagereward import ImageRewardScorer
from .official import OFFICIAL_REWARDS, OfficialCheckpointError
from .presets import REWARD_CLASSES, REWARD_PRESETS, get_reward_preset, load_reward

__all__ = [
    "AestheticScorer",
    "AffineMLPHead",
    "CLIPPreferenceScorer",
    "CallableReward",
    "CompositeReward",
    "HPSv2Scorer",
    "ImageRewardScorer",
    "JpegCompressibilityReward",
    "OFFICIAL_REWARDS",
    "OfficialCheckpointError",
    "PickScoreScorer",
    "PretrainedRewardModel",
    "REWARD_CLASSES",
    "REWARD_PRESETS",
    "RewardFunction",
    "RewardModel",
    "RewardOutput",
    "check_images",
    "get_reward_preset",
    "load_reward",
    "validate_rewards",
]

# --- bundled digits reward (src/trl_gfn/rewards/digits.py, maintained separately) ---------------
# Exported only when that module is present; its owner may replace this guarded import with a plain one.
try:
    from .digits import DigitClassifierReward  # noqa: F401
except ModuleNotFoundError as _err:  # pragma: no cover - digits.py not (yet) in this checkout
    if _err.name != f"{__name__}.digits":
        raise
else:
    __all__.append("DigitClassifierReward")
