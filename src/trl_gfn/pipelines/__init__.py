"""The RL view of diffusers pipelines: prompt encoding, trajectory sampling, policy vs reference, LoRA I/O."""

from .rl_pipeline import DiffusionPipelineForRL
from .trajectory import Trajectories, TransitionBatch
from .trl_compat import DefaultDDPOStableDiffusionPipeline

__all__ = ["DefaultDDPOStableDiffusionPipeline", "DiffusionPipelineForRL", "Trajectories", "TransitionBatch"]
