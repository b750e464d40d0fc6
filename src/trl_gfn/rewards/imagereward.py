"""ImageReward v1.0 (Xu et al., NeurIPS 2023) on transformers' BLIP modules.

Architecture: a BLIP ViT-L/16 image encoder (LayerNorm eps 1e-6, final norm on every token) whose
tokens are cross-attended by a BERT-base text encoder reading the prompt; the [CLS] feature goes through
an affine MLP 768-1024-128-64-16-1 and the result is standardised with the training-set mean and std.
The official weights map bit-exactly onto ``BlipVisionModel`` + ``BlipTextModel`` (see
:mod:`trl_gfn.rewards.convert`); the ``image-reward`` package is not used (it does not import with
transformers 5: see ``docs/rewards.md``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from .heads import AffineMLPHead
from .hub import PretrainedRewardModel, config_to_dict
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35

#: BLIP ViT-L/16 at 224 px (ImageReward's image encoder)
BLIP_VIT_L16_VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=16,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
)

#: ImageReward's ``med_config.json`` (BERT-base + cross-attention to the 1024-d image tokens)
IMAGEREWARD_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=30524,
    hidden_size=768,
    encoder_hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=512,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=0,
    bos_token_id=30522,
    sep_token_id=102,
    eos_token_id=102,
    is_decoder=True,  # in BlipTextModel, `config.is_decoder` is what creates the cross-attention layers
)


class ImageRewardScorer(PretrainedRewardModel):
    """ImageReward score (standardised, ≈ −2…2) of (image, prompt) pairs, differentiable w.r.t. the pixels.

    Preprocessing as the official ``_transform(224)``: shortest side to 224 (bicubic), center crop,
    OpenAI CLIP mean/std; prompts as the official code: BERT tokens padded/truncated to 35. The text
    encoder runs bidirectionally (``is_decoder=False`` at call time) over the prompt with
    cross-attention to all image tokens. ``BlipVisionModel.pooler_output`` is not used (it applies the
    final norm twice); the image tokens are ``last_hidden_state``.

    Make a checkpoint from ``ImageReward.pt`` + ``med_config.json`` with ``trl-gfn-convert-reward
    imagereward``; load it with ``ImageRewardScorer.from_pretrained(id_or_dir)``.

    Args:
        vision_config: ``BlipVisionConfig`` arguments (default: ViT-L/16, 224 px).
        text_config: ``BlipTextConfig`` arguments (default: ImageReward's med config).
        head_hidden_dims: hidden widths of the affine head.
        max_length: prompt length in BERT tokens.
        score_mean, score_std: standardisation of the raw head output.
    """

    tokenizer_required = True
    # ImageReward.pt keeps BLIP's pre-training projections, unused by the score (dropped by the converter)

    def __init__(
        self,
        vision_config: dict | None = None,
        text_config: dict | None = None,
        head_hidden_dims: Sequence[int] = (1024, 128, 64, 16),
        max_length: int = IMAGEREWARD_MAX_LENGTH,
        score_mean: float = IMAGEREWARD_MEAN,
        score_std: float = IMAGEREWARD_STD,
    ):
        super().__init__()
        vision_config = config_to_dict(BLIP_VIT_L16_VISION_CONFIG if vision_config is None else vision_config)
        text_config = config_to_dict(IMAGEREWARD_TEXT_CONFIG if text_config is None else text_config)
        if not text_config.get("is_decoder", False):
            raise ValueError("ImageRewardScorer text_config must have is_decoder=True (it creates the cross-attention layers)")
        self.vision = BlipVisionModel(BlipVisionConfig.from_dict(vision_config))
        self.text = BlipTextModel(BlipTextConfig.from_dict(text_config), add_pooling_layer=False)
        if self.text.config.encoder_hidden_size != self.vision.config.hidden_size:
            raise ValueError(
                f"text_config.encoder_hidden_size={self.text.config.encoder_hidden_size} must equal the image token "
                f"width vision_config.hidden_size={self.vision.config.hidden_size}"
            )
        if score_std <= 0:
            raise ValueError(f"score_std must be positive, got {score_std}")
        self.mlp = AffineMLPHead(self.text.config.hidden_size, list(head_hidden_dims))
        self.image_size = int(self.vision.config.image_size)
        self.max_length = int(max_length)
        self.score_mean = float(score_mean)
        self.score_std = float(score_std)
        self.tokenizer = None
        self._set_config(
            vision_config=vision_config,
            text_config=text_config,
            head_hidden_dims=list(head_hidden_dims),
            max_length=self.max_length,
            score_mean=self.score_mean,
            score_std=self.score_std,
        )
        self.freeze()

    def _tokenizer_spec(self) -> tuple[int, int | None]:
        return int(self.text.config.vocab_size), None

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised BLIP image tokens (B, 1 + patches, vision width) of [0, 1] images, differentiable."""
        pixels = clip_preprocess(images, self.image_size, mode="crop", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
        return self.vision(pixel_values=pixels).last_hidden_state

    def score(self, images: torch.Tensor, prompts: Sequence[str], prompt_metadata: Sequence[dict]) -> torch.Tensor:
        """Standardised ImageReward of each (image, prompt) pair, shape (B,)."""
        self._check_float32()
        tok = self._require_tokenizer()
        enc = tok(list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        image_embeds = self.image_tokens(images)
        out = self.text(
            input_ids=enc["input_ids"].to(images.device),
            attention_mask=enc["attention_mask"].to(images.device),
            encoder_hidden_states=image_embeds,
            is_decoder=False,
        )
        raw = self.mlp(out.last_hidden_state[:, 0, :])
        return (raw - self.score_mean) / self.score_std
