"""Transition maths of stochastic diffusion and flow-matching samplers (no I/O, unit-tested against diffusers)."""

from .gaussian import log_prob, log_ratio, model_output_to_epsilon, predict_x0, score_current, score_next, score_residual, step_mean
from .noise_level import NoiseLevel, as_noise_level
from .forward_process import ForwardProcess
from .schedule import (DEFAULT_FLOW_NOISE_LEVEL, FLOW_SAMPLERS, SAMPLER_CHOICES, SUPPORTED_SAMPLERS, VP_SAMPLERS, TransitionSchedule,
                       flow_schedule, make_scheduler, transition_schedule)
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
from .inversion import InvertedTrajectory, PredictionFn, ddim_schedule, deterministic_schedule, ode_generate, ode_invert, trajectory_weights

__all__ = [
    "DEFAULT_FLOW_NOISE_LEVEL",
    "FLOW_SAMPLERS",
    "ForwardProcess",
    "NoiseLevel",
    "SAMPLER_CHOICES",
    "VP_SAMPLERS",
    "as_noise_level",
    "flow_schedule",
    "FlowTransitionSchedule",
    "InvertedTrajectory",
    "MEMORYLESS_NOISE_LEVEL",
    "PredictionFn",
    "SUPPORTED_SAMPLERS",
    "TransitionSchedule",
    "ddim_schedule",
    "deterministic_schedule",
    "flow_ode_step",
    "flow_sde_coefficients",
    "flow_sde_noise_scale",
    "flow_sde_step_mean",
    "flow_transition_schedule",
    "log_prob",
    "log_ratio",
    "make_scheduler",
    "model_output_to_epsilon",
    "ode_generate",
    "ode_invert",
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
