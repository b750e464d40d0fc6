"""Fields shared by every trainer's config, named as in TRL's former ``DDPOConfig`` where the meaning is shared."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

MIXED_PRECISION = ("no", "fp16", "bf16")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


@dataclass
class DiffusionRLConfig:
    """Configuration shared by all trl-gfn trainers.

    Sampling, optimisation, logging, checkpointing and Hub fields carry the names and meanings of TRL's
    former ``DDPOConfig`` so that existing configs move over unchanged. Values are checked in
    ``__post_init__``; an invalid value raises ``ValueError`` naming the field.
    """

    # --- run ---------------------------------------------------------------------------------------
    exp_name: str = field(default=os.path.splitext(os.path.basename(sys.argv[0]))[0] or "trl_gfn", metadata={"help": "Experiment name (default: the script's file name); used for the tracker run and model card."})
    run_name: str = field(default="", metadata={"help": "Run name for the tracker and the run directory under `logdir` (default: exp_name + timestamp)."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling noise, prompt order, transition subsampling and initialisation."})
    log_with: Literal["wandb", "tensorboard", "trackio", "comet_ml", "mlflow", "all"] | None = field(default=None, metadata={"help": "accelerate tracker(s) to log to; None logs nothing."})
    tracker_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Keyword arguments for the tracker (e.g. wandb init kwargs), passed to `init_trackers`."})
    accelerator_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Extra keyword arguments for `accelerate.Accelerator`."})
    project_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Extra keyword arguments for `accelerate.utils.ProjectConfiguration`."})
    tracker_project_name: str = field(default="trl-gfn", metadata={"help": "Project name for the tracker."})
    logdir: str = field(default="logs", metadata={"help": "Top directory for runs: `<logdir>/<run_name>/checkpoints/checkpoint_N` and `<logdir>/<run_name>/final`."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the final LoRA (and flow head) are written; default `<logdir>/<run_name>/final`."})

    # --- epochs, checkpoints -----------------------------------------------------------------------
    num_epochs: int = field(default=100, metadata={"help": "Number of epochs (one epoch = sample, score, train)."})
    save_freq: int = field(default=1, metadata={"help": "Save an accelerate checkpoint every this many epochs (0 disables)."})
    num_checkpoint_limit: int = field(default=5, metadata={"help": "Keep at most this many checkpoints (older ones are deleted)."})
    resume_from: str = field(default="", metadata={"help": "Resume from a run directory (its newest checkpoint) or a `checkpoint_N` directory."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "Precision of the frozen weights and of autocast; LoRA, flow head and rewards stay float32. TRL's DDPO defaulted to fp16 (GPU); `no` runs anywhere."})
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute UNet activations in the backward pass: less memory, about a third more compute."})

    # --- sampling ------------------------------------------------------------------------------------
    sampler: Literal["ddpm", "dpm_solver_sde"] = field(default="ddpm", metadata={"help": "Stochastic sampler: `ddpm` (DDIM with eta=sample_eta) or `dpm_solver_sde` (first-order SDE-DPM-Solver++)."})
    sample_num_steps: int = field(default=50, metadata={"help": "Number of sampler steps K."})
    sample_eta: float = field(default=1.0, metadata={"help": "DDIM eta (1 = DDPM posterior); must be > 0 for the `ddpm` sampler, ignored by `dpm_solver_sde` (which must keep 1.0)."})
    sample_guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale w used to sample (and to train: the policy is the guided step)."})
    sample_batch_size: int = field(default=1, metadata={"help": "Samples per process per sampling batch."})
    sample_num_batches_per_epoch: int = field(default=2, metadata={"help": "Sampling batches per process per epoch."})
    negative_prompts: str | None = field(default=None, metadata={"help": "Negative prompt used for the unconditional branch of CFG (default: the empty prompt)."})
    prompt_set: str = field(default="simple_animals", metadata={"help": "Named prompt set shipped with trl_gfn (see `trl_gfn.prompts.available_prompt_sets()`), used when no prompt function or dataset is given."})
    log_image_freq: int = field(default=1, metadata={"help": "Log a grid of sampled images with prompts and rewards every this many epochs (0 disables)."})
    log_num_images: int = field(default=8, metadata={"help": "Number of images in the logged grid."})

    # --- optimisation --------------------------------------------------------------------------------
    train_batch_size: int = field(default=1, metadata={"help": "Trajectories per training micro-batch (per process)."})
    train_use_8bit_adam: bool = field(default=False, metadata={"help": "Use bitsandbytes' 8-bit AdamW (requires `bitsandbytes`)."})
    train_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of the LoRA parameters."})
    train_adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    train_adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    train_adam_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay of the LoRA parameters."})
    train_adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    train_gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches whose gradients are summed per optimizer step."})
    train_max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (over all trainable parameters); <= 0 disables."})
    train_num_inner_epochs: int = field(default=1, metadata={"help": "Passes over each epoch's samples."})
    train_timestep_fraction: float = field(default=1.0, metadata={"help": "Fraction of the K transitions of each trajectory to train on."})

    # --- LoRA ----------------------------------------------------------------------------------------
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the reference model is the same UNet with the adapter disabled). Full fine-tuning is not supported."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: equal to lora_rank, i.e. scale 1)."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={"help": "UNet module names that get LoRA layers."})

    # --- Hub -----------------------------------------------------------------------------------------
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final LoRA and model card to `hub_model_id` at the end of `train()`."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id for `push_to_hub` (e.g. `me/sd15-aesthetic-lora`)."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name in ("num_epochs", "sample_num_steps", "sample_batch_size", "sample_num_batches_per_epoch", "train_batch_size",
                     "train_gradient_accumulation_steps", "train_num_inner_epochs", "lora_rank", "num_checkpoint_limit"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        for name in ("save_freq", "log_image_freq", "log_num_images"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, name, f"must be a non-negative integer, got {value!r}")
        _check(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        from ..diffusion import SUPPORTED_SAMPLERS

        _check(self.sampler in SUPPORTED_SAMPLERS, "sampler", f"must be one of {SUPPORTED_SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "ddpm":
            _check(0.0 < self.sample_eta <= 1.0, "sample_eta", f"must be in (0, 1] for the stochastic `ddpm` sampler, got {self.sample_eta}")
        else:
            _check(self.sample_eta == 1.0, "sample_eta", f"is not used by the `dpm_solver_sde` sampler and must stay 1.0, got {self.sample_eta}")
        _check(self.sample_guidance_scale >= 0.0, "sample_guidance_scale", f"must be >= 0, got {self.sample_guidance_scale}")
        _check(0.0 < self.train_timestep_fraction <= 1.0, "train_timestep_fraction", f"must be in (0, 1], got {self.train_timestep_fraction}")
        _check(self.train_learning_rate > 0, "train_learning_rate", f"must be > 0, got {self.train_learning_rate}")
        _check(0.0 <= self.train_adam_beta1 < 1.0, "train_adam_beta1", f"must be in [0, 1), got {self.train_adam_beta1}")
        _check(0.0 <= self.train_adam_beta2 < 1.0, "train_adam_beta2", f"must be in [0, 1), got {self.train_adam_beta2}")
        _check(self.train_adam_weight_decay >= 0, "train_adam_weight_decay", f"must be >= 0, got {self.train_adam_weight_decay}")
        _check(self.train_adam_epsilon > 0, "train_adam_epsilon", f"must be > 0, got {self.train_adam_epsilon}")
        _check(self.use_lora, "use_lora", "full fine-tuning is not supported: the reference policy is the UNet with its LoRA adapter disabled")
        _check(bool(self.lora_target_modules), "lora_target_modules", "must name at least one module")
        if self.lora_alpha is not None:
            _check(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        batches = self.sample_batch_size * self.sample_num_batches_per_epoch
        _check(batches % self.train_batch_size == 0, "train_batch_size",
               f"must divide the samples per process per epoch (sample_batch_size * sample_num_batches_per_epoch = {batches}), got {self.train_batch_size}")
        micro = batches // self.train_batch_size
        _check(micro % self.train_gradient_accumulation_steps == 0, "train_gradient_accumulation_steps",
               f"must divide the training micro-batches per epoch ({micro} = {batches} samples / train_batch_size {self.train_batch_size}), "
               f"got {self.train_gradient_accumulation_steps}")
        if self.push_to_hub:
            _check(bool(self.hub_model_id), "hub_model_id", "must be set when push_to_hub=True")
        if self.train_use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as err:
                raise ValueError("train_use_8bit_adam: requires the `bitsandbytes` package (pip install bitsandbytes)") from err

    @property
    def num_train_timesteps(self) -> int:
        """Transitions trained per trajectory: int(K * f), at least 1 (subclasses may add the last one)."""
        return max(1, int(self.sample_num_steps * self.train_timestep_fraction))

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (for trackers, model cards and YAML)."""
        return asdict(self)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> help text (used by the docs and the example CLI)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def warn_ignored(name: str, reason: str) -> None:
    """Warn that a field is set but has no effect in this combination (never silently ignore a setting)."""
    warnings.warn(f"{name} has no effect: {reason}", UserWarning, stacklevel=3)
