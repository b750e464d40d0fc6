"""The RL view of a diffusers text-to-image pipeline: prompts in, recorded stochastic trajectories out.

One denoiser (a UNet, or SD3's transformer) serves as policy and reference: the policy is the denoiser with its
trainable LoRA adapter, the reference is the same denoiser with the adapter disabled (no second copy in memory). VAE
and text encoders are frozen. Sampling uses :mod:`trl_gfn.diffusion`'s transition maths, so what the trainers score is
exactly what was sampled.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from ..diffusion import DEFAULT_FLOW_NOISE_LEVEL, NoiseLevel, TransitionSchedule, make_scheduler, model_output_to_epsilon, step_mean, transition_schedule
from .conditioning import Conditioning
from .families import FAMILIES, ModelFamily, resolve_family
from .trajectory import Trajectories

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: name of the adapter :meth:`DiffusionPipelineForRL.add_lora` creates (diffusers' ``load_lora_weights`` names its own ``default_0``, ...)
ADAPTER_NAME = "default"


class DiffusionPipelineForRL:
    """Wrap a diffusers text-to-image pipeline of a supported model family (SD 1.x/2.x, SDXL, SD3) for RL fine-tuning.

    Build it with :meth:`from_pretrained` (a Hub id or a local directory) or from an existing pipeline
    object (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or ``StableDiffusion3Pipeline``). The wrapper owns the LoRA adapter
    (:meth:`add_lora`), the reference switch (:meth:`reference_mode`), prompt encoding, guided noise prediction,
    trajectory sampling, decoding and LoRA save/load in the family's diffusers format. What differs between
    families lives in :attr:`family` (:mod:`trl_gfn.pipelines.families`); prompt conditioning is a tensor (SD 1.x/2.x)
    or a :class:`~trl_gfn.pipelines.Conditioning` (SDXL: pooled embeddings and ``add_time_ids`` too; SD3: pooled
    projections). The network the LoRA is trained on is :attr:`denoiser` (the UNet, or SD3's transformer); :attr:`unet`
    is the same module under its older name.

    Args:
        pipeline: the diffusers pipeline.
        height, width: image size in pixels that trajectories are sampled at (multiples of the VAE scale factor times
            the UNet's down-sampling); default: the UNet's ``sample_size`` times the VAE scale factor. Non-square sizes work;
            SDXL also receives them as its size conditioning (``add_time_ids``).

    A LoRA that diffusers already loaded into the UNet (``pipeline.load_lora_weights(...)`` before wrapping) is
    detected and becomes the trained adapter once the trainer has checked it against its config
    (:meth:`ensure_lora`): training continues from it instead of adding a second, fresh adapter.
    """

    def __init__(self, pipeline: StableDiffusionPipeline, *, height: int | None = None, width: int | None = None):
        #: the family-specific part (prompt encoding, denoiser inputs, LoRA format), see :mod:`trl_gfn.pipelines.families`
        self.family: ModelFamily = resolve_family(pipeline)
        self.pipeline = pipeline
        self._size = self._check_size(height, width)
        self.weight_dtype = self.family.denoiser.dtype
        self._lora_config = None
        self.adapter_name = ADAPTER_NAME
        #: an adapter found in the UNet when wrapping (e.g. loaded by diffusers' ``load_lora_weights``), not yet checked
        self.loaded_adapter: str | None = None
        text_adapters = sorted(a for e in self.family.text_encoders() for a in (getattr(e, "peft_config", None) or {}))
        if text_adapters:
            raise ValueError(f"the text encoder has LoRA adapter(s) {text_adapters} (e.g. from load_lora_weights): trl-gfn trains and "
                             "switches off denoiser (UNet / transformer) LoRAs only. Fuse them first (pipeline.fuse_lora(components=['text_encoder']); "
                             "pipeline.unload_lora_weights()) or load a UNet-only LoRA")
        unet_adapters = sorted(getattr(self.family.denoiser, "peft_config", None) or {})
        if len(unet_adapters) > 1:
            raise ValueError(f"the {self.family.denoiser_name} has {len(unet_adapters)} LoRA adapters {unet_adapters}; trl-gfn trains one. Fuse the others into "
                             "the weights (pipeline.fuse_lora(adapter_names=[...]); pipeline.unload_lora_weights()) or load one LoRA")
        if unet_adapters:
            self.loaded_adapter = self.adapter_name = unet_adapters[0]
        for module in self.family.frozen_modules():
            module.requires_grad_(False)
        pipeline.vae.eval()
        for encoder in self.family.text_encoders():
            encoder.eval()
        if getattr(pipeline, "safety_checker", None) is not None:
            pipeline.safety_checker = None  # the trainers score raw samples; it would blank them
        pipeline.set_progress_bar_config(disable=True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        use_lora: bool = True,
        lora_rank: int = 8,
        lora_alpha: int | None = None,
        lora_target_modules: Sequence[str] | None = None,
        torch_dtype: torch.dtype | None = None,
        height: int | None = None,
        width: int | None = None,
        **kwargs: Any,
    ) -> DiffusionPipelineForRL:
        """Load a pipeline of a supported family from a Hub id or a local directory and (``use_lora``) add a LoRA adapter.

        The family comes from the model's ``model_index.json`` (``_class_name``): ``StableDiffusionXLPipeline`` and
        ``StableDiffusion3Pipeline`` load through that class, anything else through ``StableDiffusionPipeline.from_pretrained``. A missing model raises
        (there is no fallback to random weights). Extra ``kwargs`` are passed to ``from_pretrained`` (e.g.
        ``vae=AutoencoderKL.from_pretrained("madebyollin/sdxl-vae-fp16-fix")`` for SDXL in float16).
        ``lora_target_modules`` defaults to the family's (:attr:`ModelFamily.default_lora_target_modules`);
        ``height`` / ``width`` as in the constructor.
        """
        pipeline_class = _pipeline_class(pretrained_model_name_or_path, revision)
        if pipeline_class is StableDiffusionPipeline:
            kwargs.setdefault("safety_checker", None)
            kwargs.setdefault("requires_safety_checker", False)
        pipeline = pipeline_class.from_pretrained(pretrained_model_name_or_path, revision=revision, torch_dtype=torch_dtype, **kwargs)
        wrapper = cls(pipeline, height=height, width=width)
        if use_lora:
            wrapper.add_lora(lora_rank, lora_alpha, lora_target_modules)
        return wrapper

    # ------------------------------------------------------------------ components
    @property
    def denoiser(self) -> torch.nn.Module:
        """The denoising network the LoRA adapter is trained on: the UNet (SD 1.x/2.x, SDXL) or the transformer (SD3)."""
        return self.family.denoiser

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under its older name (kept for compatibility): the UNet, or SD3's transformer. Prefer :attr:`denoiser`."""
        return self.family.denoiser

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipeline.vae

    @property
    def text_encoder(self):
        """The (first) text encoder."""
        return self.pipeline.text_encoder

    @property
    def prompt_embed_dim(self) -> int:
        """Width of the token states in the prompt conditioning (all text encoders together)."""
        return self.family.prompt_embed_dim

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def name_or_path(self) -> str:
        return str(self.pipeline.config.get("_name_or_path", "") or getattr(self.pipeline, "name_or_path", "") or "")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents sampled: ``height`` / ``width`` over the VAE scale factor, else the denoiser's sample size."""
        if self._size is not None:
            size = (self._size[0] // self.vae_scale_factor, self._size[1] // self.vae_scale_factor)
        else:
            size = self.family.default_latent_size
        return (self.family.latent_channels, *size)

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int] | None:
        if height is None and width is None:
            return None
        if height is None or width is None:
            raise ValueError(f"give both height and width, or neither (got height={height}, width={width})")
        step = self.vae_scale_factor * self.family.latent_multiple
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % step:
                raise ValueError(f"{name}={value} must be a positive multiple of {step} (VAE scale factor x the denoiser's down-sampling "
                                 "or patch size)")
        return int(height), int(width)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent element along a side (2 ** (number of VAE blocks - 1))."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the sampled images."""
        _, h, w = self.latent_shape
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def to(self, device: torch.device | str) -> DiffusionPipelineForRL:
        self.pipeline.to(device)
        return self

    def set_precision(self, mixed_precision: str) -> None:
        """Cast the frozen weights (denoiser base, VAE, text encoders) to the precision of ``mixed_precision``; LoRA stays float32.

        The family may keep the VAE in float32 (SDXL's original VAE under float16, see :meth:`ModelFamily.vae_dtype`)."""
        if mixed_precision not in DTYPES:
            raise ValueError(f"mixed_precision must be one of {sorted(DTYPES)}, got {mixed_precision!r}")
        dtype = DTYPES[mixed_precision]
        for module in self.family.frozen_modules():
            module.to(dtype=self.family.vae_dtype(dtype) if module is self.vae else dtype)
        self.weight_dtype = dtype
        for p in self.lora_parameters():
            p.data = p.data.float()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute denoiser activations in backward (it is put in train mode, which is when diffusers checkpoints)."""
        self.denoiser.enable_gradient_checkpointing()
        self.denoiser.train()

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, rank: int = 8, alpha: int | None = None, target_modules: Sequence[str] | None = None) -> None:
        """Add the trainable LoRA adapter (B zero-initialised, so the policy starts equal to the reference); ``target_modules``
        defaults to the family's."""
        from peft import LoraConfig

        target_modules = target_modules if target_modules is not None else self.family.default_lora_target_modules
        if self.has_lora:
            raise ValueError("the pipeline already has a LoRA adapter")
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian", target_modules=list(target_modules))
        self.adapter_name = ADAPTER_NAME
        self.denoiser.add_adapter(config, adapter_name=ADAPTER_NAME)
        self._lora_config = config
        for p in self.lora_parameters():
            p.data = p.data.float()

    def ensure_lora(self, rank: int, alpha: int | None, target_modules: Sequence[str]) -> None:
        """Add the LoRA adapter the config asks for, or check that the existing one matches it.

        An adapter found when wrapping (:attr:`loaded_adapter`) must have the config's rank, scale alpha/rank and
        target modules (errors name ``lora_rank``, ``lora_alpha``, ``lora_target_modules``); it then becomes the
        trained adapter (float32, ``requires_grad``), so training continues from it. An adapter added by an earlier
        wrapper is made trainable again (wrapping a pipeline freezes all of its UNet, that adapter included).
        """
        if not self.has_lora:
            self.add_lora(rank, alpha, target_modules)
            return
        want_alpha = alpha if alpha is not None else rank
        if self.loaded_adapter is not None:
            self._adopt_loaded_adapter(rank, want_alpha, target_modules)
            return
        cfg = self._lora_config
        if cfg is not None:
            if cfg.r != rank:
                raise ValueError(f"lora_rank: the pipeline's LoRA adapter has rank {cfg.r} but the config asks for {rank}")
            if cfg.lora_alpha != want_alpha:
                raise ValueError(f"lora_alpha: the pipeline's LoRA adapter has alpha {cfg.lora_alpha} but the config asks for {want_alpha}")
            if set(cfg.target_modules) != set(target_modules):
                raise ValueError(f"lora_target_modules: the pipeline's adapter targets {sorted(cfg.target_modules)}, the config {sorted(target_modules)}")
        for p in self.lora_parameters():
            p.requires_grad_(True)

    def _adopt_loaded_adapter(self, rank: int, alpha: int, target_modules: Sequence[str]) -> None:
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        name = self.loaded_adapter
        layers = {n: m for n, m in self.denoiser.named_modules() if isinstance(m, LoraLayer) and name in getattr(m, "r", {})}
        where = f"the LoRA adapter {name!r} loaded into the UNet before wrapping"
        ranks = sorted({int(m.r[name]) for m in layers.values()})
        if ranks != [rank]:
            raise ValueError(f"lora_rank: {where} has rank {ranks if len(ranks) > 1 else ranks[0]}, the config asks for {rank}")
        scales = sorted({round(float(m.scaling[name]), 6) for m in layers.values()})
        if scales != [round(alpha / rank, 6)]:
            raise ValueError(f"lora_alpha: {where} scales by {scales} (alpha / rank); the config's lora_alpha={alpha} with "
                             f"lora_rank={rank} scales by {alpha / rank:g}")
        unmatched = sorted(n for n in layers if not any(n == t or n.endswith("." + t) for t in target_modules))
        unused = sorted(t for t in target_modules if not any(n == t or n.endswith("." + t) for n in layers))
        if unmatched or unused:
            raise ValueError(f"lora_target_modules: {where} wraps modules the config does not name ({unmatched[:3]}) or misses targets "
                             f"the config names ({unused}); config: {sorted(target_modules)}")
        self._lora_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
        self.denoiser.set_adapter(name)
        self.loaded_adapter = None
        for p in self.lora_parameters():
            p.requires_grad_(True)
            p.data = p.data.float()

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.denoiser, "_hf_peft_config_loaded", False)) and any("lora_" in n for n, _ in self.denoiser.named_parameters())

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of the trained adapter (:attr:`adapter_name`)."""
        return [p for n, p in self.denoiser.named_parameters() if _is_lora_param(n, self.adapter_name)]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in diffusers' LoRA key format (as ``load_lora_weights`` expects)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.denoiser, adapter_name=self.adapter_name)
        # UNet LoRAs are written in diffusers' converted key format; transformer LoRAs keep peft's keys (as diffusers' SD3 scripts do)
        return convert_state_dict_to_diffusers(state) if self.family.lora_component == "unet" else state

    def save_lora(self, save_directory: str | os.PathLike, is_main_process: bool = True) -> None:
        """Write ``pytorch_lora_weights.safetensors`` loadable with the family's ``load_lora_weights`` (e.g.
        ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline.load_lora_weights``)."""
        if not self.has_lora:
            raise ValueError("the pipeline has no LoRA adapter to save")
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.lora_state_dict().items()}
        metadata = self._lora_config.to_dict() if self._lora_config is not None else None
        if metadata is not None:
            metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
        self.family.save_lora_weights(save_directory, state, metadata, LORA_WEIGHT_NAME, is_main_process=is_main_process)

    def load_lora(self, load_directory: str | os.PathLike) -> None:
        """Load LoRA weights saved by :meth:`save_lora` into the existing adapter (strict: every key and shape must match).

        A missing, unreadable or non-finite file raises an error naming it (:func:`trl_gfn.weights_io.read_safetensors`).
        """
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        from ..weights_io import read_safetensors

        path = os.path.join(load_directory, LORA_WEIGHT_NAME)
        state = read_safetensors(path, what="LoRA weights")  # errors name the file; NaN/inf refused
        prefix = f"{self.family.lora_component}."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        state = convert_unet_state_dict_to_peft(state)
        try:
            result = set_peft_model_state_dict(self.denoiser, state, adapter_name=self.adapter_name)
        except RuntimeError as err:  # e.g. size mismatches: the file has another LoRA rank
            problems = [line.strip() for line in str(err).splitlines() if "mismatch" in line] or [str(err)]
            rank = self._lora_config.r if self._lora_config is not None else "?"
            raise ValueError(f"LoRA weights at {path} do not fit this pipeline's adapter (rank {rank}; lora_rank and lora_target_modules "
                             f"must be those the LoRA was trained with): {len(problems)} problem(s), e.g. {problems[0]}") from err
        unexpected = getattr(result, "unexpected_keys", [])
        missing = [k for k in getattr(result, "missing_keys", []) if _is_lora_param(k, self.adapter_name)]
        if unexpected or missing:
            raise ValueError(f"LoRA weights at {path} do not match the adapter: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for p in self.lora_parameters():
            p.data = p.data.float()

    @contextlib.contextmanager
    def reference_mode(self):
        """Within this context the UNet is the reference (pretrained) model: the LoRA adapter is disabled.

        Run both the forward and any backward of a reference computation inside it: with gradient
        checkpointing the backward recomputes the forward with whatever adapter state is current.
        """
        if not self.has_lora:
            yield
            return
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    # ------------------------------------------------------------------ further adapters (self-play references)
    def add_frozen_adapter(self, name: str) -> None:
        """Add a second LoRA adapter ``name`` with the trained adapter's config, frozen and inactive (float32).

        Self-play trainers keep the previous iterate's LoRA in it (:meth:`copy_adapter`) and switch to it for the
        reference (:meth:`adapter_mode`): LoRA-sized, no second UNet.
        """
        import warnings

        if not self.has_lora or self._lora_config is None:
            raise ValueError("add_frozen_adapter: the pipeline needs its trained LoRA adapter first (add_lora / ensure_lora)")
        if name == self.adapter_name or name in (getattr(self.denoiser, "peft_config", None) or {}):
            raise ValueError(f"add_frozen_adapter: the UNet already has an adapter named {name!r}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.denoiser.add_adapter(self._lora_config, adapter_name=name)
        self.denoiser.set_adapter(self.adapter_name)  # add_adapter activates the new adapter; the trained one stays active
        for p in self.adapter_parameters(name):
            p.requires_grad_(False)
            p.data = p.data.float()

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        """The parameters of adapter ``name``, in module order."""
        return [p for n, p in self.denoiser.named_parameters() if _is_lora_param(n, name)]

    @torch.no_grad()
    def copy_adapter(self, source: str, target: str) -> None:
        """Copy the weights of adapter ``source`` into adapter ``target`` (same config), in place."""
        src = {n.replace(f".{source}.", ".#."): p for n, p in self.denoiser.named_parameters() if _is_lora_param(n, source)}
        dst = {n.replace(f".{target}.", ".#."): p for n, p in self.denoiser.named_parameters() if _is_lora_param(n, target)}
        if not src or src.keys() != dst.keys():
            raise ValueError(f"copy_adapter: adapters {source!r} and {target!r} do not have the same layers")
        for key, p in dst.items():
            p.copy_(src[key])

    @contextlib.contextmanager
    def adapter_mode(self, name: str):
        """Within this context the UNet runs with adapter ``name`` instead of the trained one (e.g. a frozen earlier iterate).

        Switching back re-activates the trained adapter (``requires_grad`` on) and leaves the others frozen.
        """
        self.denoiser.set_adapter(name)
        try:
            yield
        finally:
            self.denoiser.set_adapter(self.adapter_name)

    # ------------------------------------------------------------------ maths helpers
    def resolve_sampler(self, sampler: str) -> str:
        """``sampler`` itself, or for ``"auto"`` the family's stochastic sampler (``ddpm`` for the UNet families, ``flow_sde`` for SD3)."""
        return self.family.default_sampler if sampler == "auto" else sampler

    def make_schedule(self, sampler: str, num_steps: int, eta: float = 1.0, noise_level: float = DEFAULT_FLOW_NOISE_LEVEL) -> TransitionSchedule:
        """The :class:`TransitionSchedule` of ``sampler`` (``"auto"``: :meth:`resolve_sampler`) over ``num_steps`` steps, on this
        pipeline's device. ``eta`` is DDIM's (``ddpm``), ``noise_level`` the flow SDE's a (``flow_sde``; 0: the Euler ODE)."""
        scheduler = make_scheduler(self.scheduler, self.resolve_sampler(sampler), eta)
        return transition_schedule(scheduler, num_steps, eta, device=self.device, noise_level=noise_level)

    def encode_prompts(self, prompts: Sequence[str], image_size: tuple[int, int] | None = None) -> torch.Tensor | Conditioning:
        """Prompt conditioning, one row per prompt (float32, no grad): for SD 1.x/2.x the text encoder's hidden states
        (B, L, D) padded to the tokenizer's max length, for SDXL a :class:`Conditioning` (token states of both encoders,
        pooled embedding, ``add_time_ids`` for ``image_size`` (H, W), default :attr:`image_size`; SD ignores it)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.family.encode_prompts(list(prompts), tuple(image_size) if image_size is not None else self.image_size)

    def encode_negative_prompt(self, negative_prompt: str | None, batch: int) -> torch.Tensor | Conditioning:
        """Conditioning of the unconditional CFG branch (``negative_prompt``, default empty), ``batch`` rows; SDXL with
        ``force_zeros_for_empty_prompt`` uses zeros for an empty one, as diffusers does."""
        return self.family.encode_negative_prompt(negative_prompt, batch, self.image_size)

    def guided_epsilon(
        self,
        unet: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor | Conditioning,
        negative_prompt_embeds: torch.Tensor | Conditioning,
        guidance_scale: float,
        alpha_bar: torch.Tensor | NoiseLevel,
        prediction_type: str,
    ) -> torch.Tensor:
        """Guided prediction ε̂ = ε_u + w (ε_c − ε_u) (float32), one batched denoiser call for both branches.

        The prediction is the sampler's (:func:`~trl_gfn.diffusion.model_output_to_epsilon`): the noise prediction for the
        UNet families, the velocity for SD3 (``prediction_type="flow"``). ``alpha_bar`` is the states' ᾱ or
        :class:`~trl_gfn.diffusion.NoiseLevel` (``TransitionSchedule.level``).

        ``unet`` is passed in so that trainers can use the accelerate-prepared (wrapped) module where
        parameter gradients must be synchronised. ``guidance_scale == 1`` skips the unconditional branch. The
        denoiser call itself is the family's (:meth:`ModelFamily.predict`).
        """
        dtype = self.weight_dtype
        device_type = latents.device.type
        with torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32):
            if guidance_scale == 1.0:
                out = self.family.predict(unet, latents, timesteps, prompt_embeds, dtype)
            else:
                both = self.family.predict(unet, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                                           torch.cat([negative_prompt_embeds, prompt_embeds]), dtype)
                uncond, cond = both.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
        return model_output_to_epsilon(out, latents.float(), alpha_bar, prediction_type)

    def model_output(self, unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                     prompt_embeds: torch.Tensor | Conditioning) -> torch.Tensor:
        """The denoiser's conditional output (its own parameterisation: epsilon, v, sample, or SD3's velocity) as float32, under autocast
        when the frozen weights are in half precision. ``unet`` may be the accelerate-prepared module."""
        dtype = self.weight_dtype
        with torch.autocast(device_type=latents.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return self.family.predict(unet, latents, timesteps, prompt_embeds, dtype)

    @property
    def extra_token_dim(self) -> int:
        """Width D of extra conditioning tokens (PPD's user tokens): the prompt's token width on the UNet families, the
        transformer's context width on SD3 (:attr:`ModelFamily.extra_token_dim`)."""
        return self.family.extra_token_dim

    def append_extra_tokens(self, conditioning: torch.Tensor | Conditioning, tokens: torch.Tensor) -> torch.Tensor | Conditioning:
        """``conditioning`` (B rows) with extra tokens (B, T, :attr:`extra_token_dim`) for the denoiser, by the family's route:
        appended to the token states on the UNet families, beside them (``joint_attention_kwargs``) on SD3. ``ValueError``
        naming the expected shape otherwise."""
        rows = len(conditioning)
        if tokens.ndim != 3 or tokens.shape[0] != rows or tokens.shape[2] != self.extra_token_dim:
            raise ValueError(f"extra_tokens: expected shape ({rows}, T, {self.extra_token_dim}), got {tuple(tokens.shape)}")
        return self.family.append_extra_tokens(conditioning, tokens)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generators: Sequence[torch.Generator] | None = None, *, posterior_mean: bool = False) -> torch.Tensor:
        """VAE latents (scaled as the UNet sees them) of images in [-1, 1], shape (B, 3, H, W): a sample of the VAE's
        posterior, drawn with one generator per image when ``generators`` are given (else with the global RNG), or the
        posterior's mean with ``posterior_mean=True`` (deterministic; ``generators`` must then be None)."""
        if posterior_mean and generators is not None:
            raise ValueError("encode_images: posterior_mean=True draws nothing; pass generators=None")
        dist = self.vae.encode(pixels.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        latents = mean if posterior_mean else mean + std * self._randn(mean.shape, generators, mean.device)
        if getattr(self.vae.config, "shift_factor", None):
            latents = latents - self.vae.config.shift_factor
        return latents * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents to float32 images in [0, 1] (differentiable; clamps like diffusers' postprocessing)."""
        latents = latents / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None):
            latents = latents + self.vae.config.shift_factor
        images = self.vae.decode(latents.to(self.vae.dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        schedule: TransitionSchedule,
        *,
        guidance_scale: float,
        negative_prompt: str | None = None,
        prompt_metadata: Sequence[dict] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        unet: torch.nn.Module | None = None,
        decode: bool = True,
        progress: bool = False,
        extra_tokens: torch.Tensor | None = None,
    ) -> Trajectories:
        """Sample one trajectory per prompt with the current policy, recording every state and the guided prediction (ε̂, or
        the velocity on SD3).

        ``generators`` (one per sample) make each trajectory's noise depend on its own seed only, so the
        same sample is drawn whatever the batch size or number of processes. ``extra_tokens`` (B, T, D) go with the prompt
        conditioning by the family's route (:meth:`append_extra_tokens`; e.g. PPD's user tokens); the unconditional branch gets
        zeros in their place.
        """
        from tqdm.auto import tqdm

        batch = len(prompts)
        unet = unet if unet is not None else self.denoiser
        device = self.device
        prompt_embeds = self.encode_prompts(list(prompts))
        negative = self.encode_negative_prompt(negative_prompt, batch)
        if extra_tokens is not None:
            extra = extra_tokens.to(device=prompt_embeds.device, dtype=prompt_embeds.dtype)
            prompt_embeds = self.append_extra_tokens(prompt_embeds, extra)
            negative = self.append_extra_tokens(negative, torch.zeros_like(extra))
        latents = self.initial_latents(batch, generators, device)
        states = [latents]
        epsilons = []
        for i in tqdm(range(schedule.num_steps), disable=not progress, desc="sampling", leave=False):
            index = torch.full((batch,), i, device=device, dtype=torch.long)
            like = latents
            eps = self.guided_epsilon(unet, latents, schedule.timesteps[index], prompt_embeds, negative, guidance_scale,
                                      schedule.level(index, like=like), schedule.prediction_type)
            mean = step_mean(latents, eps, schedule.gather("coef_x", index, like=like), schedule.gather("coef_eps", index, like=like))
            latents = mean + schedule.gather("std", index, like=like) * self._randn(latents.shape, generators, device)
            states.append(latents)
            epsilons.append(eps)
        traj = Trajectories(
            latents=torch.stack(states, dim=1),
            epsilons=torch.stack(epsilons, dim=1),
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            prompts=list(prompts),
            prompt_metadata=list(prompt_metadata) if prompt_metadata is not None else [{} for _ in prompts],
        )
        if decode:
            traj.images = self.decode(latents)
        return traj

    def initial_latents(self, batch: int, generators: Sequence[torch.Generator] | None = None, device: torch.device | None = None) -> torch.Tensor:
        """x_K ~ N(0, I), shape (batch, *latent_shape), one generator per sample when given.

        The samplers (:func:`trl_gfn.diffusion.make_scheduler`: DDIM/DDPM, SDE-DPM-Solver++; the flow sampler at σ = 1)
        start from unit variance whatever the pipeline's own scheduler is: an ``EulerDiscreteScheduler`` (SDXL's default)
        reports ``init_noise_sigma`` = sigma_max for its own parameterisation, which does not apply here."""
        return self._randn((batch, *self.latent_shape), generators, device if device is not None else self.device)

    @staticmethod
    def _randn(shape, generators, device) -> torch.Tensor:
        if generators is None:
            return torch.randn(shape, device=device)
        if len(generators) != shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device).to(device) for g in generators])


def _pipeline_class(pretrained_model_name_or_path: str | os.PathLike, revision: str | None) -> type:
    """The diffusers class to load a model with: the family whose ``pipeline_class`` its ``model_index.json`` names, else
    ``StableDiffusionPipeline`` (which then reports what is missing)."""
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision).get("_class_name")
    except (OSError, ValueError):
        return StableDiffusionPipeline  # its from_pretrained raises the informative error
    for family in FAMILIES:
        if family.pipeline_class.__name__ == name:
            return family.pipeline_class
    return StableDiffusionPipeline


def _is_lora_param(name: str, adapter: str) -> bool:
    """Whether parameter ``name`` belongs to LoRA adapter ``adapter`` (``...to_q.lora_A.<adapter>.weight``)."""
    parts = name.split(".")
    return any(part.startswith("lora_") and i + 1 < len(parts) and parts[i + 1] == adapter for i, part in enumerate(parts))
