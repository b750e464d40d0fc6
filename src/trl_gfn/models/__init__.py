"""Trainable models that are not part of the diffusion pipeline."""

from .flow_head import FlowHead
from .user_attention import UserCrossAttention
from .user_encoder import DigitsUserEncoder, UserEmbeddingProvider, load_user_embedding_provider

__all__ = ["DigitsUserEncoder", "FlowHead", "UserCrossAttention", "UserEmbeddingProvider", "load_user_embedding_provider"]
