"""Transition maths of stochastic diffusion and flow-matching samplers (no I/O, unit-tested against diffusers)."""

from .gaussian import log_prob, log_ratio, model_output_to_epsilon, predict_x0, score_current, score_next, score_residual, step_mean
from .schedule import SUPPORTED_SAMPLERS, TransitionSchedule, make_scheduler, transition_schedule
from .flow_matching import (
    MEMORYLESS_NOISE_LEVEL,
    FlowTransitionSchedule,
    flow_ode_step,
    flow_sde_coefficients,
    flow_sde_noise_scale,
    flow_sde_step_mean,
    flow_transition_schedule,
    velocity_to_epsilon,
    velocity_to_x0,
)
from .inversion import InvertedTrajectory, ddim_generate, ddim_invert, ddim_schedule, trajectory_weights

__all__ = [
    "FlowTransitionSchedule",
    "InvertedTrajectory",
    "MEMORYLESS_NOISE_LEVEL",
    "SUPPORTED_SAMPLERS",
    "TransitionSchedule",
    "ddim_generate",
    "ddim_invert",
    "ddim_schedule",
    "flow_ode_step",
    "flow_sde_coefficients",
    "flow_sde_noise_scale",
    "flow_sde_step_mean",
    "flow_transition_schedule",
    "log_prob",
    "log_ratio",
    "make_scheduler",
    "model_output_to_epsilon",
    "predict_x0",
    "score_current",
    "score_next",
    "score_residual",
    "step_mean",
    "trajectory_weights",
    "transition_schedule",
    "velocity_to_epsilon",
    "velocity_to_x0",
]
