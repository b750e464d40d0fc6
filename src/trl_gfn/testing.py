"""Tiny Stable Diffusion components built from configs, for tests and smoke runs (no downloads).

The components are random: they exercise every code path of the trainers at a few milliseconds per
UNet call, but they are not a model of anything. For a small *pretrained* model see
``trl_gfn.assets.BUNDLED_DIGITS_MODEL``.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from .rewards.base import RewardModel


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that a new trainer can pick another mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_tokenizer(model_max_length: int = 12) -> CLIPTokenizer:
    """A CLIP tokenizer over single byte-characters (no merges): 514 tokens, any text tokenises."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _tiny_vae(latent_size: int, **kwargs) -> AutoencoderKL:
    """The tiny VAE of the tiny pipelines (two blocks of widths 8, 16; images 2 x ``latent_size``)."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                         sample_size=2 * latent_size, **kwargs)


def _tiny_clip_config(tokenizer: CLIPTokenizer, hidden: int = 16, **kwargs) -> CLIPTextConfig:
    """The tiny CLIP text encoders' config (2 layers of width ``hidden``)."""
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=tokenizer.model_max_length, bos_token_id=512, eos_token_id=513, pad_token_id=513, **kwargs)


def tiny_stable_diffusion(seed: int = 0, prediction_type: str = "epsilon", latent_size: int = 8, width: int = 16) -> StableDiffusionPipeline:
    """A random tiny Stable Diffusion pipeline: 4×``latent_size``² latents, images twice that size."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    vae = _tiny_vae(latent_size)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_stable_diffusion_xl(seed: int = 0, latent_size: int = 8, width: int = 16, force_zeros_for_empty_prompt: bool = True,
                             ) -> StableDiffusionXLPipeline:
    """A random tiny SDXL pipeline, shaped as diffusers' own SDXL pipeline tests build it: two CLIP text encoders (the
    second with a projection giving the pooled embedding), a UNet with ``addition_embed_type="text_time"`` (time ids
    embedded in 8 dims each: 6 x 8 + 16 pooled = 64 inputs), SDXL's Euler scheduler config; images 2 x ``latent_size``."""
    torch.manual_seed(seed)
    hidden = 16
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(width, 2 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + hidden, cross_attention_dim=2 * hidden,
        norm_num_groups=8,
    )
    vae = _tiny_vae(latent_size, scaling_factor=0.13025)
    tokenizer = tiny_tokenizer()
    text_config = _tiny_clip_config(tokenizer, hidden, projection_dim=hidden)
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    # the scheduler config of stabilityai/stable-diffusion-xl-base-1.0 (keys of SD's DDIM config included, as there)
    scheduler = EulerDiscreteScheduler.from_config(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False, clip_sample=False, sample_max_value=1.0,
        set_alpha_to_one=False, skip_prk_steps=True))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)


def tiny_t5_tokenizer(model_max_length: int = 12) -> T5TokenizerFast:
    """A T5 tokenizer (Unigram, SentencePiece-style "▁" word starts) over single printable ASCII characters, built in code:
    100 tokens (<pad>, </s>, <unk>, ▁, 96 characters), no extra ids; saves and reloads unchanged."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(chr(i), -3.0) for i in range(33, 127)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_stable_diffusion_3(seed: int = 0, latent_size: int = 8, shift: float = 3.0, with_t5: bool = True) -> StableDiffusion3Pipeline:
    """A random tiny Stable Diffusion 3 pipeline, shaped as diffusers' own SD3 pipeline tests build it: an
    ``SD3Transformer2DModel`` (patch size 1, 2 joint blocks, width 16 = 2 heads x 8), two CLIP text encoders with projections (pooled
    projections 16 + 16 = 32 wide), a T5 encoder (width 32 = ``joint_attention_dim``; ``with_t5=False`` leaves it out, as
    diffusers allows), a 4-channel VAE with SD3's ``scaling_factor`` and ``shift_factor``, and SD3's
    ``FlowMatchEulerDiscreteScheduler`` (``shift``, SD3 medium's default 3). Images are 2 x ``latent_size``; 12 CLIP and
    12 T5 tokens."""
    torch.manual_seed(seed)
    hidden = 16
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=2 * hidden, caption_projection_dim=hidden, pooled_projection_dim=2 * hidden, pos_embed_max_size=4 * latent_size,
    )
    vae = _tiny_vae(latent_size, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    tokenizer = tiny_tokenizer()
    text_config = _tiny_clip_config(tokenizer, hidden, projection_dim=hidden)
    text_encoder = CLIPTextModelWithProjection(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    tokenizer_3 = tiny_t5_tokenizer()
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=2 * hidden, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                             relative_attention_num_buckets=8, decoder_start_token_id=0)) if with_t5 else None
    # the scheduler config of stabilityai/stable-diffusion-3-medium-diffusers
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(), text_encoder_3=text_encoder_3,
                                    tokenizer_3=tokenizer_3 if with_t5 else None)


def randomise_parameters(params, seed: int = 0, scale: float = 0.05) -> None:
    """Overwrite ``params`` (e.g. a LoRA's, so that policy != reference in a test) with N(0, scale²) draws from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def full_and_resumed(make_trainer, logdir, cut_epochs: int):
    """The exact-resume check's two runs: ``make_trainer("full")`` trained to the end, and ``make_trainer("cut")`` trained for
    ``cut_epochs`` epochs then rebuilt with ``resume_from=<logdir>/cut/checkpoints/checkpoint_<cut_epochs>`` and trained to the end.
    ``make_trainer(run_name, **config_overrides)`` builds a trainer whose run directory is ``<logdir>/<run_name>``. Returns
    ``(full, resumed)``."""
    import os

    full = make_trainer("full")
    full.train()
    make_trainer("cut").train(epochs=cut_epochs)
    resumed = make_trainer("cut", resume_from=os.path.join(str(logdir), "cut", "checkpoints", f"checkpoint_{cut_epochs}"))
    if resumed.first_epoch != cut_epochs:
        raise AssertionError(f"resumed at epoch {resumed.first_epoch}, expected {cut_epochs}")
    resumed.train()
    return full, resumed


def full_and_resumed_inside_an_epoch(make_trainer, logdir, save_steps: int = 1):
    """The exact-resume check from inside an epoch (preference trainers' ``save_steps``): ``make_trainer("full", save_steps=...)``
    trained to the end, and ``make_trainer("resumed", resume_from=<its first checkpoint inside an epoch>)`` trained to the end.
    Returns ``(full, resumed)``."""
    import os

    from .trainers.checkpoints import checkpoint_order

    full = make_trainer("full", save_steps=save_steps, num_checkpoint_limit=1000)
    full.train()
    folder = os.path.join(str(logdir), "full", "checkpoints")
    inside = sorted((n for n in os.listdir(folder) if (checkpoint_order(n) or (0, -1))[1] >= 0), key=checkpoint_order)
    if not inside:
        raise AssertionError(f"no checkpoint inside an epoch in {folder}: {sorted(os.listdir(folder))}")
    resumed = make_trainer("resumed", resume_from=os.path.join(folder, inside[0]))
    if resumed.state.epoch_updates < 1:
        raise AssertionError(f"{inside[0]} resumed at an epoch boundary")
    resumed.train()
    return full, resumed


class BrightnessReward(RewardModel):
    """log-reward = mean pixel value (differentiable, prompt-free)."""

    def score(self, images, prompts, prompt_metadata):
        return images.mean(dim=(1, 2, 3))


class PromptAwareReward(RewardModel):
    """Reward the red channel for prompts containing 'red', the blue channel otherwise."""

    def score(self, images, prompts, prompt_metadata):
        channel = torch.tensor([0 if "red" in p else 2 for p in prompts], device=images.device)
        return images[torch.arange(len(prompts)), channel].mean(dim=(1, 2))


def encode_png(array) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def brightness_preferences(num_pairs: int = 16, size: int = 16, seed: int = 0, captions: tuple[str, ...] = ("a cat", "a dog")):
    """A separable toy preference ``datasets.Dataset`` (Pick-a-Pic layout): two flat grey images with noise per pair,
    the brighter one preferred; which side is brighter alternates. ``user_id`` is the pair index mod 3."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "user_id": []}
    for i in range(num_pairs):
        levels = sorted(rng.uniform(0.1, 0.9, size=2))
        dark, bright = ((np.clip(level + rng.normal(0, 0.05, (size, size, 1)), 0, 1).repeat(3, axis=2) * 255).astype(np.uint8)
                        for level in levels)
        first_bright = i % 2 == 0
        rows["caption"].append(captions[i % len(captions)])
        rows["jpg_0"].append(encode_png(bright if first_bright else dark))
        rows["jpg_1"].append(encode_png(dark if first_bright else bright))
        rows["label_0"].append(1.0 if first_bright else 0.0)
        rows["user_id"].append(i % 3)
    return datasets.Dataset.from_dict(rows)
