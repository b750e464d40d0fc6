"""One config dataclass per trainer, over a shared base of DDPO-named fields."""

from .base import DiffusionRLConfig
from .nabla_gfn import NablaGFlowNetConfig

__all__ = ["DiffusionRLConfig", "NablaGFlowNetConfig"]
