"""LAION aesthetic predictor v2 ("improved aesthetic predictor", sac+logos+ava1-l14-linearMSE).

The score is an affine MLP on the L2-normalised CLIP ViT-L/14 image embedding. It is the reward of
DDPO / AlignProp / Nabla-GFlowNet's aesthetic experiments; it ignores the prompt.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .heads import AffineMLPHead
from .hub import PretrainedRewardModel, config_to_dict
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

#: vision tower of ``openai/clip-vit-large-patch14`` (the aesthetic predictor's backbone)
CLIP_VIT_L14_VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


class AestheticScorer(PretrainedRewardModel):
    """LAION aesthetic score (≈1–10) of images, differentiable w.r.t. the pixels; prompts are ignored.

    ``rewards = mlp(image_embeds / ‖image_embeds‖)`` with ``image_embeds`` the projected CLIP ViT-L/14
    embedding of the image resized (shortest side, bicubic) and center-cropped to 224 px.

    Load a converted checkpoint with ``AestheticScorer.from_pretrained(id_or_dir)``; make one from the
    official ``sac+logos+ava1-l14-linearMSE.pth`` and ``openai/clip-vit-large-patch14`` with
    ``trl-gfn-convert-reward aesthetic``. Constructing the class directly gives random weights.

    Args:
        vision_config: ``CLIPVisionConfig`` arguments (default: CLIP ViT-L/14).
        head_hidden_dims: hidden widths of the affine head (default 1024, 128, 64, 16).
    """

    tokenizer_required = False

    def __init__(self, vision_config: dict | None = None, head_hidden_dims: Sequence[int] = (1024, 128, 64, 16)):
        super().__init__()
        vision_config = config_to_dict(CLIP_VIT_L14_VISION_CONFIG if vision_config is None else vision_config)
        self.clip = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(vision_config))
        self.mlp = AffineMLPHead(self.clip.config.projection_dim, list(head_hidden_dims))
        self.image_size = int(self.clip.config.image_size)
        self._set_config(vision_config=vision_config, head_hidden_dims=list(head_hidden_dims))
        self.freeze()

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings (B, projection_dim) of [0, 1] images."""
        pixels = clip_preprocess(images, self.image_size, mode="crop", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
        embeds = self.clip(pixel_values=pixels).image_embeds
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def score(self, images: torch.Tensor, prompts: Sequence[str], prompt_metadata: Sequence[dict]) -> torch.Tensor:
        """Aesthetic score of each image, shape (B,)."""
        self._check_float32()
        return self.mlp(self.image_embeddings(images))
