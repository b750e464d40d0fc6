"""Transition maths of stochastic diffusion samplers (no I/O, unit-tested against diffusers)."""

from .gaussian import log_prob, model_output_to_epsilon, predict_x0, score_current, score_next, score_residual, step_mean
from .schedule import SUPPORTED_SAMPLERS, TransitionSchedule, make_scheduler, transition_schedule

__all__ = [
    "SUPPORTED_SAMPLERS",
    "TransitionSchedule",
    "log_prob",
    "make_scheduler",
    "model_output_to_epsilon",
    "predict_x0",
    "score_current",
    "score_next",
    "score_residual",
    "step_mean",
    "transition_schedule",
]
