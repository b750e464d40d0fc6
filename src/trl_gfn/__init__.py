"""trl-gfn: align pretrained diffusion models with reward functions, keeping diversity and prior.

Nabla-GFlowNet (residual ∇-DB) and the methods it is compared with, on one TRL-style API.
"""

__version__ = "0.1.0.dev0"

from .configs import AlignPropConfig, BaseDiffusionConfig, DDPOConfig, DiffusionDPOConfig, DiffusionRLConfig, DRaFTConfig, InversionDPOConfig, NablaGFlowNetConfig, PPDConfig, ReFLConfig, SPINDiffusionConfig
from .models import FlowHead
from .pipelines import DefaultDDPOStableDiffusionPipeline, DiffusionPipelineForRL, Trajectories, TransitionBatch
from .trainers import (
    AlignPropTrainer,
    BaseDiffusionTrainer,
    DDPOTrainer,
    DiffusionDPOTrainer,
    DiffusionRLTrainer,
    DRaFTTrainer,
    InversionDPOTrainer,
    NablaGFlowNetTrainer,
    PPDTrainer,
    ReFLTrainer,
    SPINDiffusionTrainer,
    TransitionTrainer,
)

__all__ = [
    "AlignPropConfig",
    "AlignPropTrainer",
    "BaseDiffusionConfig",
    "BaseDiffusionTrainer",
    "DDPOConfig",
    "DDPOTrainer",
    "DRaFTConfig",
    "DiffusionDPOConfig",
    "DiffusionDPOTrainer",
    "DefaultDDPOStableDiffusionPipeline",
    "DRaFTTrainer",
    "ReFLConfig",
    "ReFLTrainer",
    "SPINDiffusionConfig",
    "SPINDiffusionTrainer",
    "DiffusionPipelineForRL",
    "DiffusionRLConfig",
    "DiffusionRLTrainer",
    "FlowHead",
    "InversionDPOConfig",
    "InversionDPOTrainer",
    "NablaGFlowNetConfig",
    "NablaGFlowNetTrainer",
    "PPDConfig",
    "PPDTrainer",
    "Trajectories",
    "TransitionBatch",
    "TransitionTrainer",
]
