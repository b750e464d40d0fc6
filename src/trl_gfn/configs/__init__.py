"""One config dataclass per trainer, over a shared base of DDPO-named fields."""

from .base import BaseDiffusionConfig, DiffusionRLConfig
from .nabla_gfn import NablaGFlowNetConfig
from .ddpo import DDPOConfig
from .draft import AlignPropConfig, DRaFTConfig
from .dpo import DiffusionDPOConfig
from .inversion_dpo import InversionDPOConfig
from .spin import SPINDiffusionConfig
from .ppd import PPDConfig
from .refl import ReFLConfig

__all__ = ["AlignPropConfig", "BaseDiffusionConfig", "DDPOConfig", "DRaFTConfig", "DiffusionDPOConfig", "DiffusionRLConfig", "InversionDPOConfig", "NablaGFlowNetConfig", "PPDConfig", "ReFLConfig", "SPINDiffusionConfig"]
