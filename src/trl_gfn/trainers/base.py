"""The trainer machinery every method shares.

:class:`BaseDiffusionTrainer` holds what every trainer shares: accelerate set-up, the LoRA policy, the optimisation
step, logging, checkpoints and resume, the final save and the Hub. The online loop of the reward trainers (prompts,
sampling, rewards) is :class:`~trl_gfn.trainers.online.DiffusionRLTrainer`, with the per-transition loop of DDPO and
Nabla-GFlowNet in :class:`~trl_gfn.trainers.online.TransitionTrainer`; offline trainers (the preference trainers) build
on :class:`BaseDiffusionTrainer` directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed

from ..configs.base import BaseDiffusionConfig
from ..pipelines import DiffusionPipelineForRL
from ..pipelines.families import supported_families
from .checkpoints import (
    CHECKPOINT_PATTERN,
    CheckpointError,
    TrainingState,
    checkpoint_name,
    config_differences,
    crash_point,
    partial_path,
    prune,
    publish,
    read_manifest,
    resolve_resume_path,
    write_manifest,
)
from .publishing import PublishingMixin

logger = get_logger(__name__)

#: config fields that do not shape what a checkpoint holds: left out of the differences listed when one does not fit
RUN_ONLY_FIELDS = {"exp_name", "run_name", "logdir", "output_dir", "resume_from", "init_from", "num_epochs", "save_freq", "save_steps", "num_checkpoint_limit",
                   "log_with", "tracker_kwargs", "tracker_project_name", "accelerator_kwargs", "project_kwargs", "log_image_freq",
                   "log_num_images", "push_to_hub", "hub_model_id", "allow_tf32", "gradient_checkpointing",
                   "vae_gradient_checkpointing"}


def sample_seed(*parts: int) -> int:
    """A 63-bit seed determined by integers only (stable across processes and Python runs)."""
    return hash(tuple(int(p) for p in parts)) & ((1 << 63) - 1)


class TrainableModules(torch.nn.Module):
    """Every module the optimizer updates, behind one ``forward`` so that a single accelerate wrapper
    (DDP, DeepSpeed) synchronises all of their gradients. ``model("unet", *args)`` calls the denoiser (the UNet, or SD3's
    transformer: the name is kept so that checkpoints stay readable),
    ``model("flow_head", *args)`` another module by name.

    Modules named in :attr:`checkpointed` are called through non-reentrant ``torch.utils.checkpoint`` whenever
    grad mode is on: the call keeps only its inputs, and the backward pass recomputes the whole call (TRL's
    AlignProp checkpointed the whole UNet call the same way). The checkpoint sits *inside* this module, so under
    DDP the recomputation runs the plain sub-module, never the DDP wrapper's forward (which would re-arm gradient
    synchronisation in the middle of a backward pass).
    """

    def __init__(self, unet: torch.nn.Module, **extra: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        for name, module in extra.items():
            self.add_module(name, module)
        #: names of the sub-modules whose calls with gradient are checkpointed as a whole
        self.checkpointed: frozenset[str] = frozenset()

    def forward(self, name: str, *args: Any, checkpoint: bool | None = None, **kwargs: Any) -> Any:
        """Call sub-module ``name``; ``checkpoint`` overrides :attr:`checkpointed` for this call (None: follow it)."""
        module = getattr(self, name)
        if checkpoint is None:
            checkpoint = name in self.checkpointed
        if checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, **kwargs)
        return module(*args, **kwargs)


class _Dispatch:
    """Calls a named sub-module through the (possibly wrapped) :class:`TrainableModules`."""

    def __init__(self, model: torch.nn.Module, name: str, checkpoint: bool | None = None) -> None:
        self.model, self.name, self.checkpoint = model, name, checkpoint

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.checkpoint is not None:
            kwargs["checkpoint"] = self.checkpoint
        return self.model(self.name, *args, **kwargs)


class BaseDiffusionTrainer(PublishingMixin):
    """The machinery every trl-gfn trainer shares, online (reward) or offline (preference pairs).

    It sets up accelerate, the run directory, the LoRA policy (the reference is the same UNet with the adapter off),
    the optimizer, logging, checkpoints and resume, the final save, the model card and the Hub upload. A trainer
    subclasses it (usually through :class:`DiffusionRLTrainer` or the preference trainers) and provides its epoch
    (:meth:`step`) and, where it needs them, :meth:`setup_components` (before the trainable modules are built) and
    :meth:`finish_setup` (after the optimizer exists, before trackers start and a checkpoint is restored).

    Args:
        config: the method's config dataclass (an instance of :attr:`config_class`).
        pipeline: a :class:`DiffusionPipelineForRL` (a plain ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` is wrapped).
    """

    config_class: type[BaseDiffusionConfig] = BaseDiffusionConfig
    method_name: str = "diffusion fine-tuning"
    paper: str = ""
    citation: str = ""
    #: config fields shown in the model card
    card_fields: list[str] = ["lora_rank", "train_learning_rate", "num_epochs", "train_batch_size"]

    def __init__(self, config: BaseDiffusionConfig, pipeline: DiffusionPipelineForRL) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()
        if not isinstance(pipeline, DiffusionPipelineForRL):
            if _is_diffusers_pipeline(pipeline):
                pipeline = DiffusionPipelineForRL(pipeline)
            else:
                raise TypeError(f"pipeline must be a DiffusionPipelineForRL or a diffusers pipeline of a supported family "
                                f"({supported_families()}), got {type(pipeline).__name__}")
        self.config = config
        self.pipeline = pipeline
        #: the first distinct prompts trained on (:meth:`note_prompts`), shown in the model card
        self.card_prompts: list[str] = []
        self.resume_path = resolve_resume_path(config.resume_from) if config.resume_from else None

        project_kwargs = dict(config.project_kwargs)
        project_dir = project_kwargs.pop("project_dir", None)  # TRL's way of naming the run directory
        for key in ("automatic_checkpoint_naming", "total_limit"):  # TRL's checkpoint naming and limit: the trainer applies them
            project_kwargs.pop(key, None)
        run_name = config.run_name or f"{config.exp_name}_{time.strftime('%Y.%m.%d_%H.%M.%S')}"
        run_dir = os.path.join(config.logdir, run_name)
        if project_dir:
            run_dir = os.fspath(project_dir)
            run_name = config.run_name or os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
        if self.resume_path is not None and not config.run_name:
            # continue in the run directory the checkpoint belongs to (<run>/checkpoints/checkpoint_N)
            parent = os.path.dirname(self.resume_path)
            run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent
            run_name = os.path.basename(run_dir)
        self.run_name = run_name
        self.run_dir = run_dir
        self.output_dir = config.output_dir or os.path.join(self.run_dir, "final")

        _warn_if_launched_as_one_process()
        accelerator_kwargs = dict(config.accelerator_kwargs)
        if "cpu" not in accelerator_kwargs and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator_device():
            # launched with several processes on a machine without GPUs (e.g. `accelerate launch --multi_gpu` on CPU):
            # accelerate only sets up its gloo MULTI_CPU backend when told it runs on the CPU
            accelerator_kwargs["cpu"] = True
        #: backward calls per optimizer step; re-asserted before every accumulation step (see :meth:`accumulate`)
        self.accumulation_steps = config.train_gradient_accumulation_steps * self.backward_passes_per_micro_batch
        self.accelerator = Accelerator(
            log_with=config.log_with,
            mixed_precision=config.mixed_precision,
            project_config=ProjectConfiguration(project_dir=self.run_dir, **project_kwargs),
            gradient_accumulation_steps=self.accumulation_steps,
            **accelerator_kwargs,
        )
        if self.accelerator.is_main_process:
            os.makedirs(self.run_dir, exist_ok=True)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        set_seed(config.seed)  # same initialisation on every process

        device = self.accelerator.device
        pipeline.to(device)
        pipeline.ensure_lora(config.lora_rank, config.lora_alpha, config.lora_target_modules)
        pipeline.set_precision(config.mixed_precision)
        # the VAE decoder's checkpointing follows the config both ways (the UNet's is set on self.modules below)
        if config.vae_gradient_checkpointing:
            pipeline.vae.enable_gradient_checkpointing()
        else:
            pipeline.vae.disable_gradient_checkpointing()
        self.setup_components()

        self.modules = TrainableModules(pipeline.denoiser, **self.build_modules())
        if config.gradient_checkpointing:
            self.modules.checkpointed = frozenset({"unet"})
        self.modules.to(device)
        if config.init_from:
            self.init_weights_from(config.init_from)
        optimizer = self.build_optimizer(self.param_groups())
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and int(plugin.zero_stage or 0) >= 3:
            raise ValueError("DeepSpeed ZeRO-3 is not supported: it shards the frozen UNet, which the reference (adapter off) and "
                             "input-gradient passes use unwrapped; use ZeRO-2 (examples/accelerate_configs/deepspeed_zero2.yaml)")
        if plugin is not None:  # no dataloader tells DeepSpeed the micro-batch size: the config does
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
        self.model, self.optimizer = self.accelerator.prepare(self.modules, optimizer)
        # the counters (and a method's extra state) live in the checkpoint manifest as JSON, not in accelerate's
        # pickled custom-state files, which accelerate loads with weights_only=False
        self.state = TrainingState()
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)

        self.finish_setup()
        self.last_metrics: dict[str, float] = {}
        self._training_rewards: list[torch.Tensor] = []
        if self.accelerator.is_main_process and config.log_with is not None:
            self.accelerator.init_trackers(config.tracker_project_name, config=_flat_config(config.to_public_dict()),
                                           init_kwargs=config.tracker_kwargs)
        if self.resume_path is not None:
            logger.info(f"Resuming from {self.resume_path}")
            self.load_checkpoint(self.resume_path)
        self.first_epoch = self.state.epoch

    # ------------------------------------------------------------------ what a method overrides
    @property
    def backward_passes_per_micro_batch(self) -> int:
        """Backward calls per training micro-batch (e.g. one per trained transition)."""
        return 1

    def build_modules(self) -> dict[str, torch.nn.Module]:
        """Extra trainable modules (besides the UNet's LoRA), by name."""
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; the base trains the LoRA parameters."""
        c = self.config
        return [{"params": self.pipeline.lora_parameters(), "lr": c.train_learning_rate, "weight_decay": c.train_adam_weight_decay, "name": "lora"}]

    def setup_components(self) -> None:
        """Build what the method needs before its trainable modules (the accelerator and the LoRA pipeline exist)."""

    def finish_setup(self) -> None:
        """Finish setting up once the optimizer is prepared (before trackers start and a checkpoint is restored)."""

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch of training (and its checkpoint); returns the new global step."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, Any]:
        """A method's extra state saved in each checkpoint (JSON-serialisable: it is stored in the manifest)."""
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` saved."""

    # ------------------------------------------------------------------ building blocks
    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        c = self.config
        if c.train_use_8bit_adam:
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit
        else:
            cls = torch.optim.AdamW
        return cls(groups, lr=c.train_learning_rate, betas=(c.train_adam_beta1, c.train_adam_beta2), eps=c.train_adam_epsilon,
                   weight_decay=c.train_adam_weight_decay)

    @property
    def hide_progress(self) -> bool:
        """Progress bars show on the local main process only, and nowhere when ``TQDM_DISABLE`` is set."""
        return not self.accelerator.is_local_main_process or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")

    @property
    def unwrapped(self) -> TrainableModules:
        return self.accelerator.unwrap_model(self.model)

    def wrapped(self, name: str, checkpoint: bool | None = None) -> _Dispatch:
        """Call sub-module ``name`` through the prepared model (use it wherever parameter gradients are needed); checkpointed
        as :attr:`TrainableModules.checkpointed` says, or always (``checkpoint=True``) / never (``False``)."""
        return _Dispatch(self.model, name, checkpoint)

    def local(self, name: str, checkpoint: bool | None = None) -> _Dispatch:
        """Call sub-module ``name`` through the unwrapped :class:`TrainableModules`, without gradient synchronisation (for
        input-gradient and reference passes, which update no parameter); checkpointed as :meth:`wrapped`'s calls are, or
        always (``checkpoint=True``) / never (``False``)."""
        return _Dispatch(self.modules, name, checkpoint)

    @contextlib.contextmanager
    def accumulate(self):
        """``accelerator.accumulate(model)`` with this trainer's own number of accumulation steps.

        accelerate keeps that number in a process-wide singleton (``GradientState``): a second trainer built in
        the same process (a notebook, a sweep, a benchmark) would otherwise change how this one scales its loss
        and when it steps. Setting it at every step makes each trainer's gradient scale its own.
        """
        self.accelerator.gradient_accumulation_steps = self.accumulation_steps
        with self.accelerator.accumulate(self.model):
            yield

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def optimizer_step(self, loss_value: torch.Tensor, epoch: int) -> dict[str, float] | None:
        """At the end of an accumulation cycle: check for non-finite values on every rank, clip, step once.

        Returns the step's diagnostics (grad norms, learning rates), or None when gradients are still
        being accumulated. A non-finite loss or gradient raises ``FloatingPointError`` before any update,
        so no corrupt weights or checkpoint are ever written.

        One pass over the gradients serves the check, the logged per-group norms and the clipping: the norm of every
        gradient is computed once (``torch._foreach_norm``); a gradient holds a NaN or an infinity exactly when its norm
        is not finite; the per-group and total norms are norms of those norms; clipping multiplies by the coefficient
        of the total norm (``torch.nn.utils.clip_grad_norm_``'s, with its 1e-6). Under DeepSpeed, FSDP or XLA, whose
        gradients are sharded or clipped by the engine, clipping is left to ``accelerator.clip_grad_norm_``.
        """
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if not acc.sync_gradients:
            return None
        engine_clips = acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.XLA)
        if not engine_clips:
            acc.unscale_gradients()  # fp16 loss scaling: check, log and clip the true gradients (no-op otherwise)
        group_norms, names = [], []
        for group in self.optimizer.param_groups:
            grads = [p.grad.detach() for p in group["params"] if p.grad is not None]
            norms = torch._foreach_norm([g.float() for g in grads]) if grads else []
            group_norms.append(torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=acc.device))
            names.append(group.get("name", "group"))
        group_norms = torch.stack(group_norms).float()
        total = torch.linalg.vector_norm(group_norms)
        bad = (~torch.isfinite(loss_value.detach().float())).any().float() + (~torch.isfinite(total)).float()
        if acc.reduce(bad.reshape(1).to(acc.device), reduction="sum").item() > 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite loss or gradient at epoch {epoch} (global step {self.state.global_step}); the parameters were not "
                "updated and no checkpoint was written. Lower the learning rate or reward_scale, or enable train_max_grad_norm.")
        info = {}
        for name, norm, group in zip(names, group_norms.tolist(), self.optimizer.param_groups):
            info[f"grad_norm/{name}"] = norm
            info[f"lr/{name}"] = float(group["lr"])
        max_norm = self.config.train_max_grad_norm
        if max_norm > 0:
            if engine_clips:
                acc.clip_grad_norm_(self.trainable_parameters(), max_norm)
            else:
                coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
                grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, coefficient.to(grads[0].device))
        self.optimizer.step()
        crash_point("optimizer_step")
        self.optimizer.zero_grad(set_to_none=True)
        return info

    def start_updates(self) -> None:
        """Begin collecting the loss and per-micro-batch figures of the next optimizer update (see :meth:`train_micro_batch`)."""
        self._update_info: dict[str, list[float]] = defaultdict(list)
        self._update_loss = torch.zeros((), device=self.accelerator.device)

    def train_micro_batch(self, compute: Callable[[], tuple[torch.Tensor, dict[str, Any]]], epoch: int, global_step: int,
                          **log_context: Any) -> int:
        """One micro-batch inside the accumulation context: ``compute()`` returns ``(loss, terms)``; the loss is
        back-propagated (when it has a graph), its value and ``terms`` are collected, and at the end of an accumulation
        cycle the optimizer steps and the update is logged (with ``log_context``). Returns the new global step. Every
        training loop shares this, after :meth:`start_updates`."""
        with self.accumulate():
            loss, terms = compute()
            if loss.requires_grad:
                self.accelerator.backward(loss)
            self._update_loss = self._update_loss + loss.detach()
            for k, v in terms.items():
                self._update_info[k].append(float(v))
            stepped = self.optimizer_step(self._update_loss, epoch)
        if stepped is not None:
            global_step += 1
            self.state.global_step = global_step
            self.log_update(self._update_info, stepped, global_step, epoch=epoch, **log_context)
            self.start_updates()
        return global_step

    def log_update(self, info: dict[str, list[float]], stepped: dict[str, float], step: int, **extra: Any) -> None:
        """Log one optimizer update: each per-micro-batch figure in ``info`` averaged here and over processes, the step's
        diagnostics (``stepped``, from :meth:`optimizer_step`) and ``extra`` fields."""
        keys = list(info)
        means = torch.tensor([float(np.mean(info[k])) for k in keys], device=self.accelerator.device)
        logs = dict(zip(keys, self.accelerator.reduce(means, reduction="mean").tolist())) if keys else {}
        logs.update(stepped)
        logs.update(extra)
        self.log(logs, step=step)

    # ------------------------------------------------------------------ the loop
    def train(self, epochs: int | None = None) -> None:
        """Run epochs ``first_epoch .. epochs - 1`` (default ``config.num_epochs``), then save (and push)."""
        epochs = self.config.num_epochs if epochs is None else epochs
        global_step = self.state.global_step
        for epoch in range(self.state.epoch, epochs):
            global_step = self.step(epoch, global_step)
        self.save_pretrained(self.output_dir)
        if self.config.push_to_hub:
            self.push_to_hub(self.config.hub_model_id)
        self.accelerator.end_training()

    # ------------------------------------------------------------------ logging
    def log(self, values: dict[str, float], step: int) -> None:
        """Log scalars to the trackers (main process) and keep them as :attr:`last_metrics` for the model card."""
        values = {k: (v.item() if isinstance(v, torch.Tensor) else float(v)) for k, v in values.items()}
        self.last_metrics.update(values)
        if self.config.log_with is not None:
            self.accelerator.log(values, step=step)

    # ------------------------------------------------------------------ trained weights
    def extra_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """The trained modules besides the UNet's LoRA (e.g. the flow head), by name."""
        return [(name, module) for name, module in self.modules.named_children() if name != "unet"]

    def output_files(self) -> list[str]:
        """The files :meth:`save_trained_weights` writes, relative to its directory (what a checkpoint and an upload hold)."""
        from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

        from ..pipelines.rl_pipeline import LORA_WEIGHT_NAME

        files = [LORA_WEIGHT_NAME]
        for name, _ in self.extra_modules():
            files += [f"{name}/{CONFIG_NAME}", f"{name}/{SAFETENSORS_WEIGHTS_NAME}"]
        return files

    def save_trained_weights(self, directory: str) -> list[str]:
        """LoRA (``pytorch_lora_weights.safetensors``) and each extra module with ``save_pretrained`` in a sub-folder.

        Returns :meth:`output_files`; raises ``FloatingPointError`` (writing nothing) if a parameter is not finite.
        """
        for p in self.trainable_parameters():
            if not torch.isfinite(p).all():
                raise FloatingPointError("refusing to save: a trainable parameter is not finite")
        os.makedirs(directory, exist_ok=True)
        self.pipeline.save_lora(directory)
        crash_point("save:weights")
        for name, module in self.extra_modules():
            module.save_pretrained(os.path.join(directory, name), safe_serialization=True)
        files = self.output_files()
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise RuntimeError(f"saving the trained weights to {directory} did not write {missing}")
        return files

    def load_trained_weights(self, directory: str) -> None:
        """Load what :meth:`save_trained_weights` wrote (safetensors only; errors name the file)."""
        from .initial_weights import load_module

        self.pipeline.load_lora(directory)
        for name, module in self.extra_modules():
            load_module(module, directory, name)

    def init_weights_from(self, source: str) -> None:
        """Start from trained weights (``config.init_from``): the LoRA, and each extra module the source has.

        A module the source lacks (e.g. a flow head when starting Nabla-GFlowNet from a DDPO LoRA) keeps its
        initialisation, and a module folder this trainer does not use is left alone; both with a warning.
        """
        from .initial_weights import check_lora_metadata, load_module, module_files, resolve_weights_source

        names = [name for name, _ in self.extra_modules()]
        folder = resolve_weights_source(source, names)
        c = self.config
        check_lora_metadata(folder, c.lora_rank, c.lora_alpha if c.lora_alpha is not None else c.lora_rank)
        self.pipeline.load_lora(folder)
        for name, module in self.extra_modules():
            if os.path.isdir(os.path.join(folder, name)):
                load_module(module, folder, name)
            else:
                warnings.warn(f"init_from: {source} has no {name}/ folder; the {name} starts from its initialisation", UserWarning, stacklevel=2)
        unused = sorted(d for d in os.listdir(folder) if d not in names and all(os.path.isfile(os.path.join(folder, f)) for f in module_files(d)))
        if unused:
            warnings.warn(f"init_from: {source} also holds {unused}, which {type(self).__name__} does not train; only the LoRA is used",
                          UserWarning, stacklevel=2)
        logger.info(f"Initialised the LoRA{' and ' + ', '.join(names) if names else ''} from {source}")

    # ------------------------------------------------------------------ checkpoints
    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        """Save only what is trained (LoRA in diffusers format + extra modules), not the frozen UNet."""
        if self.accelerator.is_main_process:
            self.save_trained_weights(output_dir)
            self.save_checkpoint_extras(output_dir)
        weights.clear()  # accelerate would otherwise write the full UNet

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        self.load_trained_weights(input_dir)
        self.load_checkpoint_extras(input_dir)
        models.clear()

    def save_checkpoint_extras(self, directory: str) -> None:
        """Write a method's tensor state that checkpoints need but the final folder does not (e.g. EMA copies), as safetensors
        files in ``directory`` (main process); the manifest lists and hashes them like every other file."""

    def load_checkpoint_extras(self, directory: str) -> None:
        """Restore what :meth:`save_checkpoint_extras` wrote."""

    def _manifest_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.config.to_public_dict(), default=str))

    def save_checkpoint(self) -> str:
        """Write ``<run>/checkpoints/checkpoint_<epoch>`` (``checkpoint_<epoch>_step_<global step>`` inside an epoch, see
        :func:`~.checkpoints.checkpoint_name`) crash-safely and keep the newest ``num_checkpoint_limit``.

        ``accelerator.save_state`` (every rank) writes into a hidden partial folder; the main process then adds
        the manifest (counters, method state, config, size and SHA-256 of every file) and renames the folder
        into place, so that a ``checkpoint_N`` folder is always complete (see :mod:`.checkpoints`).
        """
        acc = self.accelerator
        folder = os.path.join(self.run_dir, "checkpoints")
        name = checkpoint_name(self.state)
        final = os.path.join(folder, name)
        partial = partial_path(folder, name)
        acc.wait_for_everyone()
        if acc.is_main_process:
            os.makedirs(folder, exist_ok=True)
            if os.path.exists(partial):  # left by a save that was killed
                shutil.rmtree(partial)
        acc.wait_for_everyone()
        acc.save_state(partial)
        acc.wait_for_everyone()
        if acc.is_main_process:
            crash_point("save:files")
            write_manifest(partial, {"trainer": type(self).__name__, **self.state.state_dict(), "num_processes": acc.num_processes,
                                     "modules": [name for name, _ in self.extra_modules()], "state": self.checkpoint_state(),
                                     "config": self._manifest_config()})
            crash_point("save:manifest")
            publish(partial, final)
            crash_point("save:published")
            prune(folder, self.config.checkpoint_limit)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str) -> None:
        """Restore weights, optimizer, RNG states, counters and method state from the complete checkpoint ``path``.

        Refuses (``CheckpointError``, naming both sides) a checkpoint of another trainer, other trained modules
        (e.g. ``use_flow_head``) or other method state; weights and optimizer state must be finite.
        """
        from accelerate.utils import load as load_weights_only  # torch.load(weights_only=True) with numpy's RNG types allowed

        acc, me = self.accelerator, type(self).__name__
        manifest = read_manifest(path)
        diff = config_differences(manifest["config"], self._manifest_config(), RUN_ONLY_FIELDS)
        hint = ("; the config differs from the checkpoint's in: " + "; ".join(diff)) if diff else ""
        if manifest["trainer"] != me:
            raise CheckpointError(f"resume_from: {path} was written by {manifest['trainer']}, not by {me}{hint}")
        modules = [name for name, _ in self.extra_modules()]
        if manifest["modules"] != modules:
            raise CheckpointError(f"resume_from: {path} holds the trained modules {['lora', *manifest['modules']]} but this {me} "
                                  f"trains {['lora', *modules]}{hint}")
        state_keys = sorted(self.checkpoint_state())
        if sorted(manifest["state"]) != state_keys:
            raise CheckpointError(f"resume_from: {path} holds the {manifest['trainer']} state {sorted(manifest['state'])} but this "
                                  f"{me} keeps {state_keys}{hint}")
        rng = os.path.join(path, f"random_states_{acc.process_index}.pkl")
        if os.path.isfile(rng):
            try:  # accelerate would skip an unreadable RNG file with a log line only
                load_weights_only(rng)
            except Exception as err:  # noqa: BLE001 - re-raised naming the file
                raise CheckpointError(f"{rng}: cannot be read with torch.load(weights_only=True): {err}") from err
        else:
            warnings.warn(f"resume_from: {path} was written by {manifest['num_processes']} process(es) and has no RNG state for "
                          f"process {acc.process_index}; its global random state is not restored (trl-gfn draws samples, prompts "
                          "and transitions from per-sample seeds, so training is unaffected)", UserWarning, stacklevel=2)
        try:
            acc.load_state(path)
        except Exception as err:  # noqa: BLE001 - re-raised with the checkpoint and the config differences
            raise CheckpointError(f"resume_from: cannot load {path}: {err}{hint}") from err
        for group in self.optimizer.state_dict()["state"].values():
            for key, value in group.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                    raise CheckpointError(f"{os.path.join(path, 'optimizer.bin')}: non-finite optimizer state ({key}); refusing to resume")
        self.state.load_state_dict(manifest)
        if self.state.epoch_updates:
            self.check_mid_epoch_resume(path, manifest)
        self.load_checkpoint_state(manifest["state"])

    def check_mid_epoch_resume(self, path: str, manifest: dict[str, Any]) -> None:
        """Refuse (``CheckpointError``) a checkpoint written inside an epoch that this run cannot continue exactly. Only the
        offline trainers, whose epoch order is fixed by the seed, write such checkpoints (``save_steps``)."""
        raise CheckpointError(f"resume_from: {path} was written inside epoch {self.state.epoch} (after {self.state.epoch_updates} of its "
                              f"updates), which {type(self).__name__} cannot continue: it checkpoints at epoch boundaries only")


def _is_diffusers_pipeline(obj: Any) -> bool:
    """Whether ``obj`` looks like a diffusers text-to-image pipeline (a denoiser, UNet or transformer, and a VAE)."""
    return (hasattr(obj, "unet") or hasattr(obj, "transformer")) and hasattr(obj, "vae")


def _is_pipeline(obj: Any) -> bool:
    return isinstance(obj, DiffusionPipelineForRL) or _is_diffusers_pipeline(obj)


def _pipeline_and_prompts(pipeline: Any, prompt_function: Any, sd_pipeline: Any) -> tuple[Any, Any]:
    """``(pipeline, prompt_function)`` from the native order, TRL's order ``(..., prompt_function, sd_pipeline)`` or ``sd_pipeline=``."""
    if sd_pipeline is not None:
        if pipeline is not None and prompt_function is not None:
            raise TypeError("got a pipeline twice: pass either pipeline or sd_pipeline (TRL's name)")
        prompt_function = prompt_function if prompt_function is not None else pipeline
        return sd_pipeline, prompt_function
    if pipeline is not None and not _is_pipeline(pipeline) and _is_pipeline(prompt_function):
        return prompt_function, pipeline  # TRL's order: (config, reward_function, prompt_function, sd_pipeline, ...)
    if pipeline is None:
        raise TypeError("missing the pipeline: a DiffusionPipelineForRL or a diffusers Stable Diffusion pipeline")
    return pipeline, prompt_function


def _warn_if_launched_as_one_process() -> None:
    """``accelerate launch --num_processes N`` without ``--multi_gpu`` (or a distributed config file) starts a single process.

    accelerate's single-process launcher still exports ``MASTER_ADDR`` when it was given more than one process, but no
    ``WORLD_SIZE``: that combination means the requested processes were not started.
    """
    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" in env and env.get("MASTER_ADDR") and "WORLD_SIZE" not in env:
        warnings.warn("accelerate launch was given --num_processes > 1 but started ONE process: the process count is used only with "
                      "--multi_gpu (which also starts several CPU processes on a machine without GPUs), --use_deepspeed, --use_fsdp or "
                      "a config file with a distributed_type. Training continues in one process.", UserWarning, stacklevel=3)


def _has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """Tracker-friendly config: lists and dicts as strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in config.items()}


__all__ = ["BaseDiffusionTrainer", "CHECKPOINT_PATTERN", "CheckpointError", "TrainableModules", "TrainingState",
           "resolve_resume_path", "sample_seed"]
