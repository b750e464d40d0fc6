"""Trainers: a shared base (accelerate, sampling, logging, checkpoints, Hub) and one module per method."""

from .base import DiffusionRLTrainer, TrainableModules, TransitionTrainer
from .nabla_gfn import NablaGFlowNetTrainer

__all__ = ["DiffusionRLTrainer", "NablaGFlowNetTrainer", "TrainableModules", "TransitionTrainer"]
