"""Evaluation metrics for reward fine-tuning of diffusion models (see docs/evaluation.md).

Reward (:func:`reward_stats`), paired win rate (:func:`win_rate`), diversity (:func:`pairwise_diversity`), prior preservation
(:func:`frechet_distance`), mode coverage (:func:`class_histogram`, :func:`histogram_entropy`) and
distribution matching (:func:`ideal_target_histogram`, :func:`total_variation`,
:func:`distribution_matching`, :func:`target_features`; and in :mod:`~trl_gfn.evaluation.soft_value`, the Monte-Carlo
ground truth of the flow gradient Nabla-GFlowNet learns), plus :func:`evaluate_samples` that computes them all for a set of images.
"""

from .metrics import (
    TargetFeatures,
    TargetHistogram,
    class_histogram,
    class_labels,
    classifier_outputs,
    distribution_matching,
    evaluate_samples,
    exact_target_histogram,
    frechet_distance,
    frechet_distance_from_stats,
    histogram_entropy,
    ideal_target_histogram,
    importance_weights,
    pairwise_diversity,
    reward_stats,
    target_features,
    total_variation,
    tv_noise_floor,
    win_rate,
)

__all__ = [
    "TargetFeatures",
    "TargetHistogram",
    "class_histogram",
    "class_labels",
    "classifier_outputs",
    "distribution_matching",
    "evaluate_samples",
    "exact_target_histogram",
    "frechet_distance",
    "frechet_distance_from_stats",
    "histogram_entropy",
    "ideal_target_histogram",
    "importance_weights",
    "pairwise_diversity",
    "reward_stats",
    "target_features",
    "total_variation",
    "tv_noise_floor",
    "win_rate",
]
