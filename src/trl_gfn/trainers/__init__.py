"""Trainers: a shared base (accelerate, sampling, logging, checkpoints, Hub) and one module per method."""

from .base import BaseDiffusionTrainer, TrainableModules
from .online import DiffusionRLTrainer, TransitionTrainer
from .checkpoints import CheckpointError, resolve_resume_path, verify_checkpoint
from .nabla_gfn import NablaGFlowNetTrainer
from .ddpo import DDPOTrainer, PerPromptStatTracker
from .diffusion_dpo import DiffusionDPOTrainer
from .inversion_dpo import InversionDPOTrainer
from .spin import SPINDiffusionTrainer
from .ppd import PPDTrainer
from .draft import AlignPropTrainer, DRaFTTrainer
from .refl import ReFLTrainer
from .reward_backprop import RewardBackpropTrainer

__all__ = ["AlignPropTrainer", "BaseDiffusionTrainer", "CheckpointError", "DDPOTrainer", "DRaFTTrainer", "DiffusionDPOTrainer", "DiffusionRLTrainer", "InversionDPOTrainer", "NablaGFlowNetTrainer",
           "PPDTrainer", "PerPromptStatTracker", "ReFLTrainer", "RewardBackpropTrainer", "SPINDiffusionTrainer", "TrainableModules", "TransitionTrainer", "resolve_resume_path",
           "verify_checkpoint"]
