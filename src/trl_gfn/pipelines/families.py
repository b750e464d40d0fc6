"""Model families: what differs between SD 1.x/2.x, SDXL and SD3 (flow matching) behind one interface.

:class:`DiffusionPipelineForRL` holds one :class:`ModelFamily` and asks it for everything family-specific: checking
the pipeline's components, which component is the denoiser (a UNet, or SD3's transformer), prompt encoding (token
states, pooled embeddings, extra conditioning), the denoiser call, the frozen modules and their dtypes, the default
sampler, the default LoRA targets and the diffusers class whose ``save_lora_weights`` / ``load_lora_weights`` define
the LoRA file format. Trainers only see the wrapper, so they never branch on the family.

Adding a family: subclass :class:`ModelFamily`, implement :meth:`~ModelFamily.matches`, :meth:`~ModelFamily.encode_prompts`,
:meth:`~ModelFamily.encode_negative_prompt` and :meth:`~ModelFamily.denoiser_inputs`, and register it in :data:`FAMILIES`
(most specific first). See ``docs/model_families.md``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)

from .conditioning import EXTRA_TOKENS, Conditioning, append_tokens

#: LoRA targets of the attention projections of a diffusers UNet (the reference setting of every trainer)
UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class ModelFamily:
    """The family-specific part of :class:`~trl_gfn.pipelines.DiffusionPipelineForRL` for one diffusers pipeline.

    Class attributes:
        name: human-readable name, used in error messages.
        pipeline_class: the diffusers pipeline class of the family; its ``save_lora_weights`` writes the LoRA files and
            its ``load_lora_weights`` reads them back.
        text_encoder_names: the pipeline attributes holding text encoders (frozen, never LoRA-trained).
        required_components: pipeline attributes that must be present (checked by :meth:`check`).
        default_lora_target_modules: LoRA targets used when none are given.
        denoiser_name: the pipeline attribute holding the denoiser (``unet``, or ``transformer`` for SD3).
        default_sampler: the stochastic sampler a config's ``sampler="auto"`` resolves to (``ddpm`` for the UNet
            families, ``flow_sde`` for flow matching).
        lora_component: the key of the denoiser's LoRA layers in the pipeline class's ``save_lora_weights`` and in the
            file (``unet`` or ``transformer``).

    Args:
        pipeline: the diffusers pipeline; :meth:`check` runs on it at construction.
    """

    name: ClassVar[str] = ""
    pipeline_class: ClassVar[type] = StableDiffusionPipeline
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    required_components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    default_lora_target_modules: ClassVar[tuple[str, ...]] = UNET_ATTENTION_TARGETS
    denoiser_name: ClassVar[str] = "unet"
    default_sampler: ClassVar[str] = "ddpm"
    lora_component: ClassVar[str] = "unet"

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        self.check()

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        """Whether ``pipeline`` looks like this family's (checked strictly afterwards by :meth:`check`)."""
        raise NotImplementedError

    def check_components(self) -> None:
        """Raise ``ValueError`` naming the first of :attr:`required_components` the pipeline lacks."""
        pipeline = self.pipeline
        for name in self.required_components:
            if getattr(pipeline, name, None) is None:
                raise ValueError(f"pipeline of type {type(pipeline).__name__} has no `{name}`; a {self.name} pipeline needs "
                                 f"{', '.join(self.required_components)}")

    def check(self) -> None:
        """Raise ``ValueError`` naming what is missing or of the wrong type."""
        self.check_components()
        pipeline = self.pipeline
        if not isinstance(pipeline.unet, UNet2DConditionModel):
            raise ValueError(f"unsupported pipeline: its unet is a {type(pipeline.unet).__name__}, expected UNet2DConditionModel")
        if not isinstance(pipeline.vae, AutoencoderKL):
            raise ValueError(f"unsupported pipeline: its vae is a {type(pipeline.vae).__name__}, expected AutoencoderKL")

    # ------------------------------------------------------------------ components
    @property
    def denoiser(self) -> torch.nn.Module:
        """The denoising network (the UNet, or SD3's transformer): the module the LoRA adapter is trained on."""
        return getattr(self.pipeline, self.denoiser_name)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipeline, n) for n in self.text_encoder_names if getattr(self.pipeline, n, None) is not None]

    def frozen_modules(self) -> list[torch.nn.Module]:
        """VAE, text encoders and denoiser: frozen when wrapping and cast by ``set_precision``."""
        return [self.pipeline.vae, *self.text_encoders(), self.denoiser]

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the denoiser takes."""
        return int(self.denoiser.config.in_channels)

    @property
    def default_latent_size(self) -> tuple[int, int]:
        """(h, w) of the latents when no image size is given: the denoiser's ``sample_size``."""
        size = self.denoiser.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of this (the UNet's down-sampling; the transformer's patch size)."""
        return 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def save_lora_weights(self, save_directory, state: dict[str, torch.Tensor], metadata: dict | None, weight_name: str,
                          is_main_process: bool = True) -> None:
        """Write the denoiser's LoRA ``state`` (diffusers key format) with the family pipeline class's ``save_lora_weights``."""
        self.pipeline_class.save_lora_weights(save_directory, is_main_process=is_main_process, weight_name=weight_name,
                                              **{f"{self.lora_component}_lora_layers": state,
                                                 f"{self.lora_component}_lora_adapter_metadata": metadata})

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the VAE runs in when the frozen weights are cast to ``dtype``."""
        return dtype

    @property
    def prompt_embed_dim(self) -> int:
        """Width D of the token states the denoiser (and a prompt-conditioned flow head) attends to."""
        return sum(int(e.config.hidden_size) for e in self.text_encoders())

    # ------------------------------------------------------------------ conditioning
    def encode_prompts(self, prompts: Sequence[str], image_size: tuple[int, int]) -> torch.Tensor | Conditioning:
        """Conditioning of ``prompts`` (one row each) for images of ``image_size`` (H, W), float32."""
        raise NotImplementedError

    def encode_negative_prompt(self, negative_prompt: str | None, batch: int, image_size: tuple[int, int]) -> torch.Tensor | Conditioning:
        """Conditioning of the unconditional branch of CFG, ``batch`` rows."""
        return self.encode_prompts([negative_prompt or ""], image_size).expand(batch, -1, -1)

    def denoiser_inputs(self, conditioning: torch.Tensor | Conditioning, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of the denoiser call for ``conditioning``, cast to ``dtype``."""
        raise NotImplementedError

    @property
    def extra_token_dim(self) -> int:
        """Width of extra conditioning tokens (PPD's user tokens): that of the prompt's token states, to which
        :meth:`append_extra_tokens` appends them."""
        return self.prompt_embed_dim

    def append_extra_tokens(self, conditioning: torch.Tensor | Conditioning, tokens: torch.Tensor) -> torch.Tensor | Conditioning:
        """``conditioning`` carrying extra tokens (B, T, :attr:`extra_token_dim`) to the denoiser: appended to the token states
        (the UNet families, whose cross-attention processors split them off after the text)."""
        return append_tokens(conditioning, tokens)

    def predict(self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor | Conditioning,
                dtype: torch.dtype) -> torch.Tensor:
        """The denoiser's raw output (its own parameterisation) as float32; inputs cast to ``dtype``. ``denoiser`` may be the
        accelerate-prepared module. UNet families call ``unet(latents, t, **denoiser_inputs).sample``; a transformer family
        overrides this."""
        return denoiser(latents.to(dtype), timesteps, **self.denoiser_inputs(conditioning, dtype)).sample.float()


class StableDiffusionFamily(ModelFamily):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder; conditioning is its (B, L, D) last hidden states, a plain tensor."""

    name = "Stable Diffusion 1.x/2.x (StableDiffusionPipeline)"
    pipeline_class = StableDiffusionPipeline

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        return getattr(pipeline, "text_encoder_2", None) is None  # the fallback: :meth:`check` says what is missing

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], image_size: tuple[int, int]) -> torch.Tensor:
        tokenizer, text_encoder = self.pipeline.tokenizer, self.pipeline.text_encoder
        tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(text_encoder.device)
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(ids.device)
        return text_encoder(ids, attention_mask=mask)[0].float()

    def denoiser_inputs(self, conditioning: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        return {"encoder_hidden_states": conditioning.to(dtype)}


class StableDiffusionXLFamily(ModelFamily):
    """SDXL: two CLIP text encoders (penultimate states concatenated), the second's pooled projection and the six size /
    crop ``add_time_ids``, passed to the UNet as ``added_cond_kwargs={"text_embeds", "time_ids"}``.

    Prompts are encoded by the pipeline's own ``encode_prompt`` (exactly what diffusers samples with). With the pipeline's
    ``force_zeros_for_empty_prompt`` (SDXL base: true) an empty negative prompt is all zeros, as in diffusers. Time ids are
    (H, W, 0, 0, H, W) for the wrapper's image size. The original SDXL VAE overflows in float16 (its config says
    ``force_upcast``); it then stays float32 under ``mixed_precision="fp16"``, unless the pipeline was built with a VAE that
    does not need it (``madebyollin/sdxl-vae-fp16-fix``).
    """

    name = "Stable Diffusion XL (StableDiffusionXLPipeline)"
    pipeline_class = StableDiffusionXLPipeline
    text_encoder_names = ("text_encoder", "text_encoder_2")
    required_components = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        return isinstance(pipeline, StableDiffusionXLPipeline) or getattr(pipeline, "text_encoder_2", None) is not None

    def check(self) -> None:
        super().check()
        unet = self.pipeline.unet
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(f"an SDXL pipeline needs a UNet with addition_embed_type='text_time', got {unet.config.addition_embed_type!r}")
        if not isinstance(self.pipeline, StableDiffusionXLPipeline):
            raise ValueError(f"unsupported pipeline {type(self.pipeline).__name__}: two text encoders are supported through "
                             "StableDiffusionXLPipeline only")

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype == torch.float16 and getattr(self.pipeline.vae.config, "force_upcast", False):
            return torch.float32
        return dtype

    def time_ids(self, image_size: tuple[int, int], rows: int) -> torch.Tensor:
        """(rows, 6) float32 ``add_time_ids``: original size, crop top-left (0, 0), target size, all ``image_size``."""
        pipeline = self.pipeline
        ids = pipeline._get_add_time_ids(tuple(image_size), (0, 0), tuple(image_size), dtype=torch.float32,
                                         text_encoder_projection_dim=int(pipeline.text_encoder_2.config.projection_dim))
        return ids.to(self.denoiser.device).expand(rows, -1)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(prompts, device=self.denoiser.device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
        return embeds.float(), pooled.float()

    def encode_prompts(self, prompts: Sequence[str], image_size: tuple[int, int]) -> Conditioning:
        embeds, pooled = self._encode(list(prompts))
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": self.time_ids(image_size, len(pooled))})

    def encode_negative_prompt(self, negative_prompt: str | None, batch: int, image_size: tuple[int, int]) -> Conditioning:
        cond = self.encode_prompts([negative_prompt or ""], image_size)
        if not negative_prompt and self.pipeline.config.get("force_zeros_for_empty_prompt", False):
            cond = Conditioning(torch.zeros_like(cond.embeds), {"text_embeds": torch.zeros_like(cond.added["text_embeds"]),
                                                                 "time_ids": cond.added["time_ids"]})
        return cond.expand(batch, -1, -1)

    def denoiser_inputs(self, conditioning: Conditioning, dtype: torch.dtype) -> dict[str, Any]:
        return {"encoder_hidden_states": conditioning.embeds.to(dtype),
                "added_cond_kwargs": {k: v.to(dtype) for k, v in conditioning.added.items()}}


class StableDiffusion3Family(ModelFamily):
    """Stable Diffusion 3 (rectified flow): an ``SD3Transformer2DModel`` predicting the velocity, a
    ``FlowMatchEulerDiscreteScheduler``, three text encoders (CLIP-L, CLIP-G, T5; T5 may be absent, as diffusers allows).

    Prompts are encoded by the pipeline's own ``encode_prompt``: token states (B, 77 + T, D) of the CLIP encoders (their
    penultimate states concatenated, zero-padded to T5's width) followed by T5's, and the pooled projections of both CLIP
    encoders (B, 2048 at full size), passed to the transformer as ``pooled_projections``. T's length is
    ``min(256, tokenizer_3.model_max_length)`` (256: the pipeline's default ``max_sequence_length``). The negative prompt
    is encoded like any prompt (SD3 does not zero an empty one). The VAE decodes ``latents / scaling_factor +
    shift_factor``. The default sampler is the flow SDE (``flow_sde``, :mod:`trl_gfn.diffusion.flow_matching`); the
    denoiser's output is the velocity (``prediction_type="flow"``). LoRA files are written and read with
    ``StableDiffusion3Pipeline.save_lora_weights(transformer_lora_layers=...)`` / ``load_lora_weights``.
    """

    name = "Stable Diffusion 3 (StableDiffusion3Pipeline)"
    pipeline_class = StableDiffusion3Pipeline
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    required_components = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    denoiser_name = "transformer"
    default_sampler = "flow_sde"
    lora_component = "transformer"
    #: SD3's context length of T5 tokens (the pipeline's default ``max_sequence_length``)
    max_sequence_length = 256

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        return isinstance(pipeline, StableDiffusion3Pipeline) or getattr(pipeline, "transformer", None) is not None

    def check(self) -> None:
        self.check_components()
        pipeline = self.pipeline
        if not isinstance(pipeline, StableDiffusion3Pipeline):
            raise ValueError(f"unsupported pipeline {type(pipeline).__name__}: a transformer denoiser is supported through "
                             "StableDiffusion3Pipeline only")
        if not isinstance(pipeline.transformer, SD3Transformer2DModel):
            raise ValueError(f"unsupported pipeline: its transformer is a {type(pipeline.transformer).__name__}, expected SD3Transformer2DModel")
        if not isinstance(pipeline.vae, AutoencoderKL):
            raise ValueError(f"unsupported pipeline: its vae is a {type(pipeline.vae).__name__}, expected AutoencoderKL")
        if not isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"an SD3 pipeline needs a FlowMatchEulerDiscreteScheduler, got {type(pipeline.scheduler).__name__}")

    @property
    def prompt_embed_dim(self) -> int:
        """Width of the joint token states: the transformer's ``joint_attention_dim`` (T5's width)."""
        return int(self.denoiser.config.joint_attention_dim)

    @property
    def latent_multiple(self) -> int:
        return int(self.denoiser.config.patch_size)

    @property
    def sequence_length(self) -> int:
        """Number T of T5 tokens: ``min(256, tokenizer_3.model_max_length)`` (256 without a T5 tokenizer)."""
        tokenizer = getattr(self.pipeline, "tokenizer_3", None)
        return min(self.max_sequence_length, int(tokenizer.model_max_length)) if tokenizer is not None else self.max_sequence_length

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], image_size: tuple[int, int]) -> Conditioning:
        pipeline = self.pipeline
        embeds, _, pooled, _ = pipeline.encode_prompt(list(prompts), None, None, device=pipeline.transformer.device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False, max_sequence_length=self.sequence_length)
        return Conditioning(embeds.float(), {"pooled_projections": pooled.float()})

    def denoiser_inputs(self, conditioning: Conditioning, dtype: torch.dtype) -> dict[str, Any]:
        inputs = {"encoder_hidden_states": conditioning.embeds.to(dtype), "pooled_projections": conditioning.added["pooled_projections"].to(dtype)}
        if EXTRA_TOKENS in conditioning.added:
            inputs["joint_attention_kwargs"] = {EXTRA_TOKENS: conditioning.added[EXTRA_TOKENS].to(dtype)}
        return inputs

    @property
    def extra_token_dim(self) -> int:
        """Width of extra tokens: the transformer's context stream (``caption_projection_dim``), where they are attended to."""
        return int(self.denoiser.config.caption_projection_dim)

    def append_extra_tokens(self, conditioning: Conditioning, tokens: torch.Tensor) -> Conditioning:
        """Extra tokens travel beside the prompt (``added["extra_tokens"]``), not appended to it: the transformer would pass
        appended tokens through its ``context_embedder``. The denoiser call hands them to the attention processors as
        ``joint_attention_kwargs={"extra_tokens": ...}``; without a processor that reads them (PPD's
        ``JointUserAttnProcessor``) diffusers ignores them with a warning."""
        return Conditioning(conditioning.embeds, {**conditioning.added, EXTRA_TOKENS: tokens.to(conditioning.embeds.dtype)})

    def predict(self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                dtype: torch.dtype) -> torch.Tensor:
        """The transformer's velocity (float32) at ``latents`` and timesteps σ·1000."""
        return denoiser(hidden_states=latents.to(dtype), timestep=timesteps, return_dict=False,
                        **self.denoiser_inputs(conditioning, dtype))[0].float()


#: the supported families, most specific first (the first whose ``matches`` accepts a pipeline handles it)
FAMILIES: list[type[ModelFamily]] = [StableDiffusion3Family, StableDiffusionXLFamily, StableDiffusionFamily]


def supported_families() -> str:
    """The supported families, for error messages."""
    return "; ".join(f.name for f in FAMILIES)


def resolve_family(pipeline: Any) -> ModelFamily:
    """The :class:`ModelFamily` of ``pipeline`` (checked); ``ValueError`` naming the supported families otherwise."""
    for family in FAMILIES:
        if family.matches(pipeline):
            try:
                return family(pipeline)
            except ValueError as err:
                raise ValueError(f"{err}. Supported families: {supported_families()}") from None
    raise ValueError(f"unsupported pipeline {type(pipeline).__name__}. Supported families: {supported_families()}")
