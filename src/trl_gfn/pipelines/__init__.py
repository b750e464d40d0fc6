"""The RL view of diffusers pipelines: prompt encoding, trajectory sampling, policy vs reference, LoRA I/O."""

from .conditioning import EXTRA_TOKENS, Conditioning, append_tokens
from .families import FAMILIES, ModelFamily, StableDiffusion3Family, StableDiffusionFamily, StableDiffusionXLFamily
from .rl_pipeline import DiffusionPipelineForRL
from .trajectory import Trajectories, TransitionBatch
from .trl_compat import DefaultDDPOStableDiffusionPipeline

__all__ = ["EXTRA_TOKENS", "FAMILIES", "Conditioning", "DefaultDDPOStableDiffusionPipeline", "DiffusionPipelineForRL", "ModelFamily", "StableDiffusion3Family", "StableDiffusionFamily",
           "StableDiffusionXLFamily", "Trajectories", "TransitionBatch", "append_tokens"]
