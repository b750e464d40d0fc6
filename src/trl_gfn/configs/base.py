"""Fields shared by every trainer's config, named as in TRL's former ``DDPOConfig`` where the meaning is shared."""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .public import redact, strip_local_path
from .validation import check_fields, check_kwargs, check_name

MIXED_PRECISION = ("no", "fp16", "bf16")
#: a Hub repository id: ``name`` or ``namespace/name``
HUB_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


@dataclass
class BaseDiffusionConfig:
    """Configuration shared by all trl-gfn trainers, online (reward) and offline (preference pairs).

    Run, optimisation, logging, checkpointing, LoRA and Hub fields carry the names and meanings of TRL's
    former ``DDPOConfig`` so that existing configs move over unchanged; :class:`DiffusionRLConfig` adds
    the sampling fields of the online trainers. Values are checked in
    ``__post_init__`` (and again by the trainer): every field's type against its annotation (no coercion:
    ``'False'`` is not a bool), finiteness, the range declared in ``field_ranges``, then the combinations
    of fields; an invalid value raises ``ValueError`` naming the field.
    """

    # --- run ---------------------------------------------------------------------------------------
    exp_name: str = field(default=os.path.splitext(os.path.basename(sys.argv[0]))[0] or "trl_gfn", metadata={"help": "Experiment name (default: the script's file name); used for the tracker run and model card. A plain folder name (no path separators)."})
    run_name: str = field(default="", metadata={"help": "Run name for the tracker and the run directory under `logdir` (default: exp_name + timestamp). A plain folder name: no `/`, `\\`, `.` or `..`."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling noise, prompt order, transition subsampling and initialisation (0 to 2**32 - 1)."})
    log_with: Literal["wandb", "tensorboard", "trackio", "comet_ml", "mlflow", "all"] | None = field(default=None, metadata={"help": "accelerate tracker(s) to log to; None logs nothing."})
    tracker_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Init kwargs per tracker, passed to `init_trackers`, e.g. `{\"wandb\": {\"entity\": \"me\"}}`. Credential-like entries (keys containing key, token, secret, password, ...) are redacted from everything logged, saved or uploaded."})
    accelerator_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Extra keyword arguments for `accelerate.Accelerator` (not those set from config fields: mixed_precision, log_with, project_config, gradient accumulation)."})
    project_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Keyword arguments for `accelerate.utils.ProjectConfiguration` (e.g. `logging_dir`). TRL's keys keep their meaning: `project_dir` is the run directory (instead of `<logdir>/<run_name>`; checkpoints in `<project_dir>/checkpoints/checkpoint_N`), `total_limit` the number of checkpoints kept (instead of num_checkpoint_limit), `automatic_checkpoint_naming` must be True (checkpoints are always named that way)."})
    tracker_project_name: str = field(default="trl-gfn", metadata={"help": "Project name for the tracker."})
    logdir: str = field(default="logs", metadata={"help": "Top directory for runs: `<logdir>/<run_name>/checkpoints/checkpoint_N` and `<logdir>/<run_name>/final`."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the final LoRA (and flow head) are written; default `<logdir>/<run_name>/final`."})

    # --- epochs, checkpoints -----------------------------------------------------------------------
    num_epochs: int = field(default=100, metadata={"help": "Number of epochs (online trainers: one epoch = sample, score, train; preference trainers: one pass over the pairs)."})
    save_freq: int = field(default=1, metadata={"help": "Save an accelerate checkpoint every this many epochs (0 disables). Default 1, as TRL's DDPO and AlignProp (Nabla-GFlowNet: 10)."})
    num_checkpoint_limit: int = field(default=5, metadata={"help": "Keep at most this many checkpoints (older ones are deleted)."})
    resume_from: str = field(default="", metadata={"help": "Resume from a run directory (its newest complete checkpoint; newer incomplete ones are skipped with a warning) or a checkpoint directory, `checkpoint_N` or (preference trainers' save_steps) `checkpoint_N_step_S`, which must be complete."})
    init_from: str = field(default="", metadata={"help": "Start a new run from trained weights: a folder written by trl-gfn (`<run>/final` or a `checkpoint_N`), or any folder or Hub repo (`owner/name`, `owner/name@revision`) holding `pytorch_lora_weights.safetensors` in diffusers format; Nabla-GFlowNet also loads the flow head from its `flow_head/` sub-folder when there is one. lora_rank, lora_alpha and lora_target_modules must be those the LoRA was trained with. Counters and optimizer start fresh (resume_from continues an interrupted run instead)."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "Precision of the frozen weights and of autocast; LoRA, flow head and rewards stay float32. TRL's DDPO defaulted to fp16 (GPU); `no` runs anywhere."})
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Checkpoint every UNet call made with gradient as a whole (non-reentrant `torch.utils.checkpoint`, as TRL's AlignProp did): the call keeps only its inputs and the backward pass recomputes it. Same gradients; one more UNet forward per differentiated call (docs/memory.md)."})
    vae_gradient_checkpointing: bool = field(default=False, metadata={"help": "Checkpoint the VAE decoder block by block when the reward is differentiated through it: same gradients, less memory, one more decoder forward per reward gradient (docs/memory.md)."})

    # --- optimisation --------------------------------------------------------------------------------
    train_batch_size: int = field(default=1, metadata={"help": "Trajectories (online trainers) or preference pairs (preference trainers) per training micro-batch (per process)."})
    train_use_8bit_adam: bool = field(default=False, metadata={"help": "Use bitsandbytes' `AdamW8bit` (TRL's field): the two AdamW moments of every trained tensor with at least 4096 elements are kept in 8 bits (block-wise quantised), smaller tensors keep float32 moments. For SD1.5 this shrinks the optimizer state from 214 to 55 MB with a flow head, 13 to 4 MB for LoRA r8 alone (docs/memory.md). Requires `bitsandbytes` (CPU or GPU); without it the config raises an error naming this field."})
    train_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of the LoRA parameters."})
    train_adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    train_adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    train_adam_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay of the LoRA parameters."})
    train_adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    train_gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches whose gradients are summed per optimizer step."})
    train_max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (over all trainable parameters); 0 disables."})

    # --- LoRA (always: the reference policy is the same UNet with the adapter switched off; no full fine-tuning) ---------
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: equal to lora_rank, i.e. scale 1)."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={"help": "UNet module names that get LoRA layers."})

    # --- Hub -----------------------------------------------------------------------------------------
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final LoRA and model card to `hub_model_id` at the end of `train()`."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id for `push_to_hub` (e.g. `me/sd15-aesthetic-lora`)."})

    #: range of every numeric field (checked with the type from the annotation by ``validation.check_fields``)
    field_ranges = {
        "seed": "[0, 4294967295]", "num_epochs": ">= 1", "save_freq": ">= 0", "num_checkpoint_limit": ">= 1", "train_batch_size": ">= 1",
        "train_learning_rate": "> 0", "train_adam_beta1": "[0, 1)", "train_adam_beta2": "[0, 1)", "train_adam_weight_decay": ">= 0",
        "train_adam_epsilon": "> 0", "train_gradient_accumulation_steps": ">= 1", "train_max_grad_norm": ">= 0", "lora_rank": ">= 1",
        "lora_alpha": ">= 1",
    }

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field: every field's type and range first, then combinations."""
        check_fields(self)
        check_name("exp_name", self.exp_name, allow_empty=False)
        check_name("run_name", self.run_name, allow_empty=True)
        _check(bool(self.logdir), "logdir", f"must be a non-empty directory path, got {self.logdir!r}")
        _check(not (self.init_from and self.resume_from), "init_from",
               "cannot be combined with resume_from: resume_from continues a run (weights, optimizer, counters from a checkpoint), "
               f"init_from starts a new one from trained weights; got init_from={self.init_from!r}, resume_from={self.resume_from!r}")
        _check(bool(self.tracker_project_name), "tracker_project_name", f"must be a non-empty string, got {self.tracker_project_name!r}")
        self._check_kwargs_fields()
        _check(all(self.lora_target_modules), "lora_target_modules", f"must name modules (non-empty strings), got {self.lora_target_modules!r}")
        if self.push_to_hub:
            _check(bool(self.hub_model_id), "hub_model_id", "must be set when push_to_hub=True")
        if self.hub_model_id is not None:
            _check(bool(HUB_REPO_ID.match(self.hub_model_id)), "hub_model_id",
                   f"must be a Hub repository id such as 'me/my-lora' (letters, digits, '-', '_', '.'), got {self.hub_model_id!r}")
        if self.train_use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as err:
                raise ValueError("train_use_8bit_adam: requires the `bitsandbytes` package (pip install bitsandbytes)") from err

    def _check_kwargs_fields(self) -> None:
        """The kwargs dicts go to accelerate: unknown keys, or keys a config field already sets, are rejected here."""
        from accelerate import Accelerator
        from accelerate.utils import LoggerType, ProjectConfiguration

        check_kwargs("accelerator_kwargs", self.accelerator_kwargs, Accelerator.__init__, reserved={
            "log_with": "log_with", "mixed_precision": "mixed_precision", "project_config": "logdir/run_name and project_kwargs",
            "project_dir": "logdir/run_name", "gradient_accumulation_steps": "train_gradient_accumulation_steps",
            "gradient_accumulation_plugin": "train_gradient_accumulation_steps"})
        check_kwargs("project_kwargs", self.project_kwargs, ProjectConfiguration, reserved={"iteration": "the trainer's epoch counter"})
        pk = self.project_kwargs
        if "automatic_checkpoint_naming" in pk:
            _check(pk["automatic_checkpoint_naming"] is True, "project_kwargs",
                   f"['automatic_checkpoint_naming'] can only be True: checkpoints are always <run>/checkpoints/checkpoint_<epoch>, got {pk}")
        if "total_limit" in pk:
            limit = pk["total_limit"]
            _check(isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1, "project_kwargs",
                   f"['total_limit'] must be an integer >= 1 (the number of checkpoints kept), got {limit!r}")
            _check(self.num_checkpoint_limit in (limit, _field_default(type(self), "num_checkpoint_limit")), "num_checkpoint_limit",
                   f"conflicts with project_kwargs['total_limit']={limit} (both set how many checkpoints are kept); set one of them, "
                   f"got {self.num_checkpoint_limit}")
        if pk.get("project_dir") is not None:
            _check(isinstance(pk["project_dir"], (str, os.PathLike)) and bool(os.fspath(pk["project_dir"])), "project_kwargs",
                   f"['project_dir'] must be a directory path, got {pk['project_dir']!r}")
            _check(not self.run_name and self.logdir == _field_default(type(self), "logdir"), "project_kwargs",
                   f"['project_dir'] names the run directory, as do logdir/run_name (logdir={self.logdir!r}, run_name={self.run_name!r}); "
                   "set only one of them")
        trackers = [t.value for t in LoggerType]
        for key, value in self.tracker_kwargs.items():
            _check(key in trackers, "tracker_kwargs",
                   f"must map a tracker name ({trackers}) to that tracker's init kwargs, e.g. {{'wandb': {{'entity': 'me'}}}}; got key {key!r}")
            _check(isinstance(value, dict), "tracker_kwargs", f"[{key!r}] must be a dict of init kwargs, got {value!r}")
            if self.log_with is None or (self.log_with != "all" and key != self.log_with):
                warn_ignored(f"tracker_kwargs[{key!r}]", f"log_with={self.log_with!r} does not start that tracker")

    @property
    def checkpoint_limit(self) -> int:
        """How many checkpoints are kept: ``project_kwargs['total_limit']`` (TRL's name) or ``num_checkpoint_limit``."""
        return int(self.project_kwargs.get("total_limit", self.num_checkpoint_limit))

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (e.g. to save the config as YAML); see :meth:`to_public_dict` for what may be shared."""
        return asdict(self)

    def to_public_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` safe to upload or log (what the trainers write to ``training_config.json``, model cards,
        trackers and checkpoint manifests): credential-like entries of the kwargs dicts redacted, local absolute
        paths reduced to ``<local>/<last component>`` in every field (the path fields, and any other field that names a
        file or folder, such as a reward or provider folder), except the prompt text fields."""
        out = self.to_dict()
        for name, value in out.items():
            if isinstance(value, dict):
                out[name] = strip_local_path(redact(value))
            elif "prompt" not in name:  # the path fields and any other field naming a local file or folder
                out[name] = strip_local_path(value)
        return out

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> help text (used by the docs and the example CLI)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


@dataclass
class DiffusionRLConfig(BaseDiffusionConfig):
    """Configuration shared by the online trainers, which sample from the policy and score the samples with a reward.

    Adds the sampling fields of TRL's former ``DDPOConfig`` (sampler, steps, guidance, batches per epoch, prompts,
    image logging) and the per-epoch training passes over the samples. ``sampler="auto"`` (default) resolves to the model
    family's stochastic sampler when the trainer is built (:meth:`resolve_sampler`): DDIM with ``sample_eta`` on SD 1.x/2.x
    and SDXL, the flow SDE with ``sample_noise_level`` on SD3, so one config runs on every family.
    """

    # --- sampling ------------------------------------------------------------------------------------
    sampler: Literal["auto", "ddpm", "dpm_solver_sde", "flow_sde"] = field(default="auto", metadata={"help": "Stochastic sampler. `auto` (default): the model family's — `ddpm` for SD 1.x/2.x and SDXL, `flow_sde` for SD3 — so one config runs on every family. `ddpm`: DDIM with eta=sample_eta (UNet families); `dpm_solver_sde`: first-order SDE-DPM-Solver++ (UNet families); `flow_sde`: Flow-GRPO's marginal-preserving SDE on the flow-matching sigmas (SD3) with noise level sample_noise_level (0: the deterministic Euler ODE, gradient methods only). docs/flow_matching.md."})
    sample_num_steps: int = field(default=50, metadata={"help": "Number of sampler steps K."})
    sample_eta: float = field(default=1.0, metadata={"help": "DDIM eta of the UNet families' `ddpm` sampler (1 = DDPM posterior; must be > 0). The other samplers do not use it and it must stay 1.0 there (`dpm_solver_sde`; `flow_sde`, whose noise is sample_noise_level)."})
    sample_noise_level: float = field(default=0.7, metadata={"help": "Noise level a of the flow sampler (`flow_sde`, SD3): diffusion coefficient g(σ) = a·sqrt(σ/(1−σ)); 0.7 is Flow-GRPO's default, sqrt(2) the memoryless (DDPM-like) level, 0 the deterministic Euler ODE — which has no transition density, so only gradient-through-sampler trainers (DRaFT, AlignProp, ReFL) accept 0. The UNet samplers do not use it and it must stay 0.7 there."})
    sample_guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale w used to sample (and to train: the policy is the guided step)."})
    sample_batch_size: int = field(default=1, metadata={"help": "Samples per process per sampling batch."})
    sample_num_batches_per_epoch: int = field(default=2, metadata={"help": "Sampling batches per process per epoch."})
    negative_prompts: str | None = field(default=None, metadata={"help": "Negative prompt used for the unconditional branch of CFG (default: the empty prompt)."})
    prompt_set: str = field(default="simple_animals", metadata={"help": "Named prompt set shipped with trl_gfn (see `trl_gfn.prompts.available_prompt_sets()`), used when no prompt function or dataset is given."})
    log_image_freq: int = field(default=1, metadata={"help": "Log a grid of sampled images with prompts and rewards every this many epochs (0 disables). Default 1, as TRL's DDPO and AlignProp (Nabla-GFlowNet: 10)."})
    log_num_images: int = field(default=8, metadata={"help": "Number of images in the logged grid (>= 1; set log_image_freq=0 to log none)."})

    train_num_inner_epochs: int = field(default=1, metadata={"help": "Passes over each epoch's samples (Nabla-GFlowNet, DDPO; must stay 1 on the trainers that differentiate through the sampler)."})
    train_timestep_fraction: float = field(default=1.0, metadata={"help": "Fraction of the K transitions of each trajectory to train on (Nabla-GFlowNet, DDPO; must stay 1.0 on the trainers that differentiate through the sampler)."})
    train_pack_timesteps: bool = field(default=False, metadata={"help": "Nabla-GFlowNet and DDPO (an error on the trainers that differentiate through the sampler): train every selected transition of a micro-batch of `train_batch_size` trajectories in one loss call (batch `train_batch_size` × transitions per trajectory) instead of one call per transition index with the gradients accumulated: the same gradient and the same optimizer updates, from fewer and larger model calls (a training epoch of the bundled digits model 1.6× (1 thread) to 2.3× (2 threads) faster on a CPU, benchmarks/digits_epoch_cost.py), at that many times the activation memory. Off by default: on SD-sized models memory, not call overhead, is the limit (docs/memory.md)."})

    field_ranges = {
        "sample_num_steps": ">= 1", "sample_eta": "[0, 1]", "sample_noise_level": ">= 0", "sample_guidance_scale": ">= 0", "sample_batch_size": ">= 1",
        "sample_num_batches_per_epoch": ">= 1", "log_image_freq": ">= 0", "log_num_images": ">= 1", "train_num_inner_epochs": ">= 1",
        "train_timestep_fraction": "(0, 1]",
    }

    def validate(self) -> None:
        super().validate()
        from ..prompts import available_prompt_sets

        _check(self.prompt_set in available_prompt_sets(), "prompt_set", f"must be one of {available_prompt_sets()}, got {self.prompt_set!r}")
        from ..diffusion import SAMPLER_CHOICES

        _check(self.sampler in SAMPLER_CHOICES, "sampler", f"must be one of {SAMPLER_CHOICES}, got {self.sampler!r}")
        if self.sampler in ("ddpm", "auto"):
            _check(0.0 < self.sample_eta <= 1.0, "sample_eta", f"must be in (0, 1] for the stochastic `ddpm` sampler, got {self.sample_eta}")
        else:
            _check(self.sample_eta == 1.0, "sample_eta", f"is not used by the `{self.sampler}` sampler and must stay 1.0, got {self.sample_eta}")
        default_level = _field_default(type(self), "sample_noise_level")
        if self.sampler in ("ddpm", "dpm_solver_sde"):
            _check(self.sample_noise_level == default_level, "sample_noise_level",
                   f"is the flow sampler's noise level and has no effect with sampler={self.sampler!r}; leave it at {default_level}, "
                   f"got {self.sample_noise_level}")
        elif self.requires_transition_density:
            _check(self.sample_noise_level > 0, "sample_noise_level",
                   f"0 makes the flow sampler the deterministic Euler ODE, whose transitions have no density; {type(self).__name__}'s "
                   "trainer needs one (log-probabilities or ∇-DB scores). Use a noise level > 0 (Flow-GRPO: 0.7), or a gradient-through-"
                   "sampler trainer (DRaFT, AlignProp, ReFL) for the ODE")
        if not self.requires_transition_density:  # gradient through the sampler: no recorded transitions are replayed
            for name in ("train_timestep_fraction", "train_num_inner_epochs", "train_pack_timesteps"):
                default = _field_default(type(self), name)
                _check(getattr(self, name) == default, name,
                       f"applies to the trainers that replay recorded transitions (Nabla-GFlowNet, DDPO); {type(self).__name__}'s trainer "
                       f"differentiates through the sampler and does not use it: leave it at {default!r}, got {getattr(self, name)!r}")
        batches = self.sample_batch_size * self.sample_num_batches_per_epoch
        _check(batches % self.train_batch_size == 0, "train_batch_size",
               f"must divide the samples per process per epoch (sample_batch_size * sample_num_batches_per_epoch = {batches}), got {self.train_batch_size}")
        micro = batches // self.train_batch_size
        _check(micro % self.train_gradient_accumulation_steps == 0, "train_gradient_accumulation_steps",
               f"must divide the training micro-batches per epoch ({micro} = {batches} samples / train_batch_size {self.train_batch_size}), "
               f"got {self.train_gradient_accumulation_steps}")

    #: whether the trainer scores the sampler's transition densities (DDPO's log-probabilities, ∇-DB's scores): then the
    #: deterministic flow ODE (sample_noise_level=0) is refused; gradient-through-sampler configs set it False
    requires_transition_density = True

    def resolve_sampler(self, family_sampler: str) -> str:
        """The sampler to build for a model family whose stochastic sampler is ``family_sampler`` (``ddpm`` or ``flow_sde``):
        ``sampler`` itself, or ``family_sampler`` for ``auto`` (:func:`resolve_sampler`)."""
        return resolve_sampler(self, family_sampler, self.sampler)

    @property
    def num_train_timesteps(self) -> int:
        """Transitions trained per trajectory: int(K * f), at least 1 (subclasses may add the last one)."""
        return max(1, int(self.sample_num_steps * self.train_timestep_fraction))


def resolve_sampler(config: Any, family_sampler: str, sampler: str = "auto") -> str:
    """``sampler``, or ``family_sampler`` (the model family's stochastic sampler, ``ddpm`` or ``flow_sde``) for ``auto``, for a
    config with ``sample_eta`` and ``sample_noise_level`` fields. Raises ``ValueError`` naming the field when the sampler does
    not fit the family, or a setting has no effect on it (``sample_eta`` on SD3, ``sample_noise_level`` on the UNet families)."""
    from ..diffusion import FLOW_SAMPLERS

    resolved = family_sampler if sampler == "auto" else sampler
    family_is_flow = family_sampler in FLOW_SAMPLERS
    if (resolved in FLOW_SAMPLERS) != family_is_flow:
        kind = "flow-matching (SD3)" if family_is_flow else "variance-preserving UNet (SD 1.x/2.x, SDXL)"
        raise ValueError(f"sampler: {resolved!r} does not fit this {kind} model; use 'auto' or {family_sampler!r}")
    if family_is_flow:
        _check(config.sample_eta == 1.0, "sample_eta", "is the DDIM eta of the UNet families and has no effect on a flow-matching model "
               f"(SD3), whose sampler noise is sample_noise_level; leave it at 1.0, got {config.sample_eta}")
    else:
        default_level = _field_default(type(config), "sample_noise_level")
        _check(config.sample_noise_level == default_level, "sample_noise_level",
               f"is the flow sampler's noise level and has no effect on a UNet model (sampler {resolved!r}); leave it at "
               f"{default_level}, got {config.sample_noise_level}")
    return resolved


def _field_default(cls: type, name: str) -> Any:
    f = {f.name: f for f in fields(cls)}[name]
    return f.default


def warn_ignored(name: str, reason: str) -> None:
    """Warn that a field is set but has no effect in this combination (never silently ignore a setting)."""
    warnings.warn(f"{name} has no effect: {reason}", UserWarning, stacklevel=3)
