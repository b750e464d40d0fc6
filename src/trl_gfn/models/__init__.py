"""Trainable models that are not part of the diffusion pipeline."""

from .flow_head import FlowHead

__all__ = ["FlowHead"]
