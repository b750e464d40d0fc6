"""Prompt-conditioned CLIP preference rewards: HPSv2 / HPSv2.1 and PickScore.

Both are CLIP ViT-H/14 models fine-tuned on human preferences and both score an image-prompt pair by
the cosine of the normalised image and text embeddings; they differ in preprocessing and scale:

============  ==========================================  ===================================
reward        preprocessing (differentiable, in torch)    score
============  ==========================================  ===================================
HPSv2(.1)     longest side to 224 (bicubic), zero-pad     cosine (≈0.2–0.35)
PickScore     shortest side to 224 (bicubic), crop        ``logit_scale.exp()`` · cosine (≈18–24)
============  ==========================================  ===================================

The HPS checkpoints are OpenCLIP state dicts; :mod:`trl_gfn.rewards.convert` maps them onto
``transformers.CLIPModel`` (the published ``hpsv2`` package is not used: see ``docs/rewards.md``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from transformers import CLIPConfig, CLIPModel

from .hub import PretrainedRewardModel, config_to_dict
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

#: OpenCLIP ViT-H-14 (laion2B-s32B-b79K; the architecture of HPSv2, HPSv2.1 and PickScore) as a CLIPConfig
CLIP_VIT_H14_CONFIG: dict[str, Any] = dict(
    projection_dim=1024,
    text_config=dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
        projection_dim=1024,
    ),
    vision_config=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=1024,
    ),
)


class CLIPPreferenceScorer(PretrainedRewardModel):
    """Shared machinery of CLIP-based prompt-image rewards (not used directly).

    Text embeddings are computed without a graph (they do not depend on the images and the model is
    frozen); the image branch keeps its graph so the reward is differentiable w.r.t. the pixels.
    """

    tokenizer_required = True
    preprocess_mode: ClassVar[str] = "crop"
    use_logit_scale: ClassVar[bool] = False

    def _build(self, clip_config: dict | None) -> dict:
        clip_config = config_to_dict(CLIP_VIT_H14_CONFIG if clip_config is None else clip_config)
        self.clip = CLIPModel(CLIPConfig.from_dict(clip_config))
        self.image_size = int(self.clip.config.vision_config.image_size)
        self.max_length = int(self.clip.config.text_config.max_position_embeddings)
        self.tokenizer = None
        return clip_config

    def _tokenizer_spec(self) -> tuple[int, int | None]:
        text = self.clip.config.text_config
        eos = text.eos_token_id
        # configs written before transformers PR #24773 carry eos_token_id=2 and pool at argmax(input_ids)
        return int(text.vocab_size), (None if eos == 2 else eos)

    def text_embeddings(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        """L2-normalised text embeddings (B, projection_dim) of ``prompts`` (no graph)."""
        tok = self._require_tokenizer()
        enc = tok(list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.no_grad():
            pooled = self.clip.text_model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).pooler_output
            embeds = self.clip.text_projection(pooled)
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, projection_dim) of [0, 1] images, differentiable."""
        pixels = clip_preprocess(images, self.image_size, mode=self.preprocess_mode, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
        pooled = self.clip.vision_model(pixel_values=pixels).pooler_output
        embeds = self.clip.visual_projection(pooled)
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def score(self, images: torch.Tensor, prompts: Sequence[str], prompt_metadata: Sequence[dict]) -> torch.Tensor:
        """Score of each (image, prompt) pair, shape (B,)."""
        self._check_float32()
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts, images.device)).sum(-1)
        if self.use_logit_scale:
            return self.clip.logit_scale.exp() * cosine
        return cosine


class HPSv2Scorer(CLIPPreferenceScorer):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): cosine of CLIP ViT-H/14 image and prompt embeddings.

    Preprocessing follows HPSv2's evaluation transform: longest side resized to 224 (bicubic), zero
    padding to a square, OpenAI CLIP mean/std. No logit scale: the score is the bare cosine, so
    differences between images are small (≈0.01–0.05), which is why the reference ``reward_scale`` for
    HPS is larger than for the aesthetic score (see :mod:`trl_gfn.rewards.presets`).

    Make a checkpoint from ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` with
    ``trl-gfn-convert-reward hpsv2``; load it with ``HPSv2Scorer.from_pretrained(id_or_dir)``.

    Args:
        clip_config: ``CLIPConfig`` arguments (default: OpenCLIP ViT-H-14 with GELU).
        version: ``"v2.0"`` or ``"v2.1"``: which official checkpoint the weights come from (metadata).
    """

    preprocess_mode = "pad"
    use_logit_scale = False
    VERSIONS: ClassVar[tuple[str, ...]] = ("v2.0", "v2.1")

    def __init__(self, clip_config: dict | None = None, version: str = "v2.1"):
        super().__init__()
        if version not in self.VERSIONS:
            raise ValueError(f"HPSv2Scorer version must be one of {self.VERSIONS}, got {version!r}")
        self.version = version
        clip_config = self._build(clip_config)
        self._set_config(clip_config=clip_config, version=version)
        self.freeze()


class PickScoreScorer(CLIPPreferenceScorer):
    """PickScore v1 (Kirstain et al. 2023): ``logit_scale.exp()`` · cosine of CLIP-H image and prompt embeddings.

    Preprocessing follows the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor PickScore uses:
    shortest side resized to 224 (bicubic), center crop, OpenAI CLIP mean/std. PickScore is already a
    ``transformers.CLIPModel`` (``yuvalkirstain/PickScore_v1``); ``trl-gfn-convert-reward pickscore``
    repackages it with its tokenizer after checking that nothing is missing.

    Args:
        clip_config: ``CLIPConfig`` arguments (default: CLIP ViT-H/14).
    """

    preprocess_mode = "crop"
    use_logit_scale = True

    def __init__(self, clip_config: dict | None = None):
        super().__init__()
        clip_config = self._build(clip_config)
        self._set_config(clip_config=clip_config)
        self.freeze()
