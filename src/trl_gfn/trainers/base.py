"""The trainer machinery every method shares: accelerate set-up, sampling, rewards, the optimisation step,
logging, checkpoints, the final save and the Hub.

A method subclasses :class:`DiffusionRLTrainer` and provides only what differs: its config class, the
extra trainable modules it needs (:meth:`build_modules`), its parameter groups, and how it trains on an
epoch's samples (:meth:`train_on_samples`, usually through :class:`TransitionTrainer`'s loop and its own
:meth:`compute_loss`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ..configs.base import DiffusionRLConfig
from ..pipelines import DiffusionPipelineForRL, Trajectories, TransitionBatch
from ..prompts import PromptSource
from ..rewards.base import validate_rewards
from .checkpoints import (
    CHECKPOINT_PATTERN,
    CheckpointError,
    TrainingState,
    config_differences,
    crash_point,
    partial_path,
    prune,
    publish,
    read_manifest,
    resolve_resume_path,
    write_manifest,
)
from .hub import public_model_name, render_model_card, upload_files

logger = get_logger(__name__)

#: config fields that do not shape what a checkpoint holds: left out of the differences listed when one does not fit
RUN_ONLY_FIELDS = {"exp_name", "run_name", "logdir", "output_dir", "resume_from", "num_epochs", "save_freq", "num_checkpoint_limit",
                   "log_with", "tracker_kwargs", "tracker_project_name", "accelerator_kwargs", "project_kwargs", "log_image_freq",
                   "log_num_images", "push_to_hub", "hub_model_id", "allow_tf32", "gradient_checkpointing",
                   "vae_gradient_checkpointing"}


def sample_seed(*parts: int) -> int:
    """A 63-bit seed determined by integers only (stable across processes and Python runs)."""
    return hash(tuple(int(p) for p in parts)) & ((1 << 63) - 1)


class TrainableModules(torch.nn.Module):
    """Every module the optimizer updates, behind one ``forward`` so that a single accelerate wrapper
    (DDP, DeepSpeed) synchronises all of their gradients. ``model("unet", *args)`` calls the UNet,
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


class DiffusionRLTrainer:
    """Base class of the trl-gfn trainers (see the module docstring for what a method overrides).

    Args:
        config: the method's config dataclass.
        reward_function: ``reward_fn(images, prompts, prompt_metadata) -> (rewards, metadata)``; an
            ``nn.Module`` is moved to the device, frozen and kept in float32.
        pipeline: a :class:`DiffusionPipelineForRL` (a plain ``StableDiffusionPipeline`` is wrapped).
        prompt_function: a callable ``() -> (prompt, metadata)``, a list of prompts, a ``datasets.Dataset``
            with a ``prompt`` column, or a prompt-set name; default ``config.prompt_set``.
        image_samples_hook: optional ``hook(prompt_image_data, global_step, tracker)`` called when images
            are logged (as in TRL's former DDPOTrainer).
    """

    config_class: type[DiffusionRLConfig] = DiffusionRLConfig
    method_name: str = "diffusion RL"
    paper: str = ""
    citation: str = ""
    #: whether the method differentiates the reward w.r.t. the images
    needs_reward_gradient: bool = True
    #: config fields shown in the model card
    card_fields: list[str] = ["sample_num_steps", "sample_guidance_scale", "sampler", "lora_rank", "train_learning_rate",
                              "num_epochs", "sample_batch_size", "train_batch_size"]

    def __init__(
        self,
        config: DiffusionRLConfig,
        reward_function: Callable,
        pipeline: DiffusionPipelineForRL,
        prompt_function: Any = None,
        image_samples_hook: Callable | None = None,
    ) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()
        if not callable(reward_function):
            raise TypeError(f"reward_function must be callable (images, prompts, metadata) -> (rewards, metadata), got {type(reward_function).__name__}")
        if not isinstance(pipeline, DiffusionPipelineForRL):
            if hasattr(pipeline, "unet") and hasattr(pipeline, "vae"):
                pipeline = DiffusionPipelineForRL(pipeline)
            else:
                raise TypeError(f"pipeline must be a DiffusionPipelineForRL or a diffusers Stable Diffusion pipeline, got {type(pipeline).__name__}")
        self.config = config
        self.pipeline = pipeline
        self.image_samples_hook = image_samples_hook
        self.resume_path = resolve_resume_path(config.resume_from) if config.resume_from else None

        run_name = config.run_name or f"{config.exp_name}_{time.strftime('%Y.%m.%d_%H.%M.%S')}"
        run_dir = os.path.join(config.logdir, run_name)
        if self.resume_path is not None and not config.run_name:
            # continue in the run directory the checkpoint belongs to (<run>/checkpoints/checkpoint_N)
            parent = os.path.dirname(self.resume_path)
            run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent
            run_name = os.path.basename(run_dir)
        self.run_name = run_name
        self.run_dir = run_dir
        self.output_dir = config.output_dir or os.path.join(self.run_dir, "final")

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
            project_config=ProjectConfiguration(project_dir=self.run_dir, **config.project_kwargs),
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
        self.schedule = pipeline.make_schedule(config.sampler, config.sample_num_steps, config.sample_eta)

        if isinstance(reward_function, torch.nn.Module):
            reward_function.to(device=device, dtype=torch.float32)
            reward_function.requires_grad_(False)
            reward_function.eval()
        self.reward_fn = reward_function

        self.modules = TrainableModules(pipeline.unet, **self.build_modules())
        if config.gradient_checkpointing:
            self.modules.checkpointed = frozenset({"unet"})
        self.modules.to(device)
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

        self.prompt_source = PromptSource(prompt_function if prompt_function is not None else config.prompt_set, seed=config.seed)
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

    def train_on_samples(self, samples: Trajectories | None, epoch: int, global_step: int) -> int:
        """Train on one epoch's samples; return the new global step."""
        raise NotImplementedError

    @property
    def samples_needed(self) -> bool:
        """Whether the epoch begins by sampling trajectories without gradient (all but direct backprop methods)."""
        return True

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

    def compute_rewards(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict], *, need_grad: bool) -> tuple[torch.Tensor, dict]:
        """Call the reward function in float32 (autocast off) and check its output against the contract."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            output = self.reward_fn(images.float(), list(prompts), list(metadata))
        rewards, meta = validate_rewards(output, images.shape[0], need_grad=need_grad and torch.is_grad_enabled())
        return rewards.float().to(images.device), meta

    def reward_gradient(self, images_or_latents: torch.Tensor, prompts, metadata, *, decode: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """∇ of the per-sample log-reward w.r.t. ``images_or_latents`` (decoded first if ``decode``); returns (grad, rewards).

        Only an input gradient: the graph (VAE + reward) is freed on return and no parameter ``.grad`` changes.
        """
        x = images_or_latents.detach().float().requires_grad_(True)
        with torch.enable_grad():
            images = self.pipeline.decode(x) if decode else x
            rewards, _ = self.compute_rewards(images, prompts, metadata, need_grad=True)
            (grad,) = torch.autograd.grad(rewards.sum(), x)
        return grad, rewards.detach()

    def sample_epoch(self, epoch: int, score: bool = True) -> Trajectories:
        """Sample ``sample_num_batches_per_epoch`` batches with the current policy and (``score``) decode and score them
        (no gradient); with ``score=False`` the trajectories have neither ``images`` nor ``rewards``."""
        parts, pending = [], []
        for b in tqdm(range(self.config.sample_num_batches_per_epoch), desc=f"Epoch {epoch}: sampling", disable=self.hide_progress, leave=False):
            traj = self.sample_batch(epoch, b, decode=score)
            crash_point("sample")
            parts.append(traj)
            if score:
                pending.append(self.start_scoring(traj))
        for traj, rewards in zip(parts, pending):
            traj.rewards = rewards()
        return Trajectories.concatenate(parts)

    @property
    def rewards_from_training(self) -> bool:
        """Whether training itself computes r(x_0) of every sampled trajectory and records it (:meth:`record_training_rewards`).
        Then the samples of an epoch are decoded and scored only when that epoch logs images, and ``reward_mean`` /
        ``reward_std`` are logged from the recorded rewards after training (the same values). False by default."""
        return False

    def record_training_rewards(self, rewards: torch.Tensor) -> None:
        """Record rewards of sampled x_0 computed by the loss (see :attr:`rewards_from_training`)."""
        self._training_rewards.append(rewards.detach().float())

    def start_scoring(self, traj: Trajectories) -> Callable[[], torch.Tensor]:
        """Begin scoring a sampled batch; returns a function that gives its rewards.

        Scores at once here; DDPO's ``async_reward_computation`` overrides it to overlap scoring with sampling.
        """
        rewards = self.score_no_grad(traj.images, traj.prompts, traj.prompt_metadata)
        return lambda: rewards

    def score_no_grad(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
        """Rewards without gradient (grad mode is thread-local, so it is set here, also in worker threads)."""
        with torch.no_grad():
            return self.compute_rewards(images, prompts, metadata, need_grad=False)[0]

    def batch_sample_ids(self, batch_index: int, batch_size: int) -> list[int]:
        """Global sample ids of this process's ``batch_index``-th batch of ``batch_size`` (same set for any process count)."""
        acc = self.accelerator
        return [(batch_index * acc.num_processes + acc.process_index) * batch_size + j for j in range(batch_size)]

    def sample_generators(self, epoch: int, ids: Sequence[int]) -> list[torch.Generator]:
        """One generator per sample, seeded by (seed, epoch, sample id) only."""
        return [torch.Generator(device=self.accelerator.device).manual_seed(sample_seed(self.config.seed, epoch, i)) for i in ids]

    def sample_batch(self, epoch: int, batch_index: int, decode: bool = True) -> Trajectories:
        """Sample (no gradient, not scored) this process's ``batch_index``-th batch of the epoch, with ``sample_ids`` set
        (and ``images`` if ``decode``)."""
        c, acc = self.config, self.accelerator
        ids = self.batch_sample_ids(batch_index, c.sample_batch_size)
        prompts, metadata = self.prompt_source(ids, epoch)
        traj = self.pipeline.sample(prompts, self.schedule, guidance_scale=c.sample_guidance_scale, negative_prompt=c.negative_prompts,
                                    prompt_metadata=metadata, generators=self.sample_generators(epoch, ids), decode=decode)
        traj.sample_ids = torch.tensor(ids, device=acc.device)
        return traj

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

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch: sample and score, log, train, checkpoint. Returns the new global step."""
        acc, c = self.accelerator, self.config
        start = time.time()
        samples = None
        log_images = bool(c.log_image_freq) and epoch % c.log_image_freq == 0
        score = not self.rewards_from_training or log_images
        self._training_rewards = []
        if self.samples_needed:
            samples = self.sample_epoch(epoch, score=score)
            sample_time = time.time() - start
            logs = {"epoch": epoch, "samples_per_second": len(samples) * acc.num_processes / max(sample_time, 1e-9)}
            if score:
                rewards = acc.gather(samples.rewards.detach())
                logs.update(reward_mean=rewards.mean().item(), reward_std=rewards.std(unbiased=False).item())
            self.log(logs, step=global_step)
            if log_images:
                self.log_images(samples, global_step, epoch)
        global_step = self.train_on_samples(samples, epoch, global_step)
        if self.samples_needed and not score:
            # every trajectory's r(x_0), computed by the loss (once per inner epoch: repeating each value n times changes
            # neither the mean nor the population std)
            if not self._training_rewards:
                raise RuntimeError(f"{type(self).__name__}.rewards_from_training is True but training recorded no reward")
            rewards = acc.gather(torch.cat(self._training_rewards))
            self.log({"reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item()}, step=global_step)
        self.state.epoch = epoch + 1
        self.state.global_step = global_step
        self.log({"epoch_seconds": time.time() - start}, step=global_step)
        if c.save_freq and (epoch + 1) % c.save_freq == 0:
            self.save_checkpoint()
        return global_step

    # ------------------------------------------------------------------ logging
    def log(self, values: dict[str, float], step: int) -> None:
        """Log scalars to the trackers (main process) and keep them as :attr:`last_metrics` for the model card."""
        values = {k: (v.item() if isinstance(v, torch.Tensor) else float(v)) for k, v in values.items()}
        self.last_metrics.update(values)
        if self.config.log_with is not None:
            self.accelerator.log(values, step=step)

    def log_images(self, samples: Trajectories, global_step: int, epoch: int) -> None:
        """Save a grid of the main process's samples (with prompts and rewards) and send it to the trackers."""
        if not self.accelerator.is_main_process or samples.images is None:
            return
        from PIL import Image

        n = min(self.config.log_num_images, len(samples))
        images = (samples.images[:n].detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        captions = [f"{p} | {r:.3f}" for p, r in zip(samples.prompts[:n], samples.rewards[:n].tolist())]
        folder = os.path.join(self.run_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.concatenate(list(images), axis=1)).save(os.path.join(folder, f"epoch_{epoch:04d}.png"))
        with open(os.path.join(folder, f"epoch_{epoch:04d}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(captions) + "\n")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": images}, step=global_step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"samples": [wandb.Image(img, caption=cap) for img, cap in zip(images, captions)]}, step=global_step)
        if self.image_samples_hook is not None:
            data = [[samples.images[:n], samples.prompts[:n], samples.prompt_metadata[:n], samples.rewards[:n]]]
            self.image_samples_hook(data, global_step, self.accelerator.trackers[0] if self.accelerator.trackers else None)

    # ------------------------------------------------------------------ trained weights
    def extra_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """The trained modules besides the UNet's LoRA (e.g. the flow head), by name."""
        return [(name, module) for name, module in self.unwrapped.named_children() if name != "unet"]

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
        from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

        from ..rewards.hub import load_state_dict_strict
        from ..weights_io import read_safetensors

        self.pipeline.load_lora(directory)
        for name, module in self.extra_modules():
            config_file = os.path.join(directory, name, CONFIG_NAME)
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"{name}: no file {config_file}")
            with open(config_file, encoding="utf-8") as f:
                saved = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
            own = {k: v for k, v in json.loads(module.to_json_string()).items() if not k.startswith("_")}
            differ = {k: (saved.get(k), own.get(k)) for k in set(saved) | set(own) if saved.get(k) != own.get(k)}
            if differ:
                raise ValueError(f"{config_file}: the saved {name} has another architecture than this trainer's "
                                 f"(saved vs now: {differ})")
            weights = os.path.join(directory, name, SAFETENSORS_WEIGHTS_NAME)
            load_state_dict_strict(module, read_safetensors(weights, what=f"{name} weights"), source=weights)

    # ------------------------------------------------------------------ checkpoints
    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        """Save only what is trained (LoRA in diffusers format + extra modules), not the frozen UNet."""
        if self.accelerator.is_main_process:
            self.save_trained_weights(output_dir)
        weights.clear()  # accelerate would otherwise write the full UNet

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        self.load_trained_weights(input_dir)
        models.clear()

    def _manifest_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.config.to_public_dict(), default=str))

    def save_checkpoint(self) -> str:
        """Write ``<run>/checkpoints/checkpoint_<epoch>`` crash-safely and keep the newest ``num_checkpoint_limit``.

        ``accelerator.save_state`` (every rank) writes into a hidden partial folder; the main process then adds
        the manifest (counters, method state, config, size and SHA-256 of every file) and renames the folder
        into place, so that a ``checkpoint_N`` folder is always complete (see :mod:`.checkpoints`).
        """
        acc = self.accelerator
        folder = os.path.join(self.run_dir, "checkpoints")
        final = os.path.join(folder, f"checkpoint_{self.state.epoch}")
        partial = partial_path(folder, self.state.epoch)
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
            prune(folder, self.config.num_checkpoint_limit)
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
        self.load_checkpoint_state(manifest["state"])

    # ------------------------------------------------------------------ final save, model card, Hub
    def final_files(self) -> list[str]:
        """The files :meth:`save_pretrained` writes and :meth:`push_to_hub` uploads (nothing else in the folder is uploaded)."""
        return ["README.md", "training_config.json", *self.output_files()]

    def save_pretrained(self, output_dir: str | None = None) -> str:
        """Write the final LoRA (diffusers format), extra modules, the public config and a model card (main process)."""
        output_dir = output_dir or self.output_dir
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.save_trained_weights(output_dir)
            with open(os.path.join(output_dir, "training_config.json"), "w", encoding="utf-8") as f:
                json.dump(self.config.to_public_dict(), f, indent=2, default=str)
            with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(self.create_model_card(repo_id=self.config.hub_model_id or os.path.basename(os.path.abspath(output_dir))))
        self.accelerator.wait_for_everyone()
        return output_dir

    def model_card_extra_usage(self) -> str:
        return ""

    def create_model_card(self, repo_id: str = "<repo_id>") -> str:
        """The model card text: method and paper, base model, reward, key config values, final metrics, loading code."""
        reward = getattr(self.reward_fn, "name", None) or type(self.reward_fn).__name__
        if reward == "function":
            reward = getattr(self.reward_fn, "__name__", "custom reward")
        metrics = {k: v for k, v in self.last_metrics.items() if not k.startswith("lr/")}
        return render_model_card(repo_id=repo_id, base_model=public_model_name(self.pipeline.name_or_path), method=self.method_name,
                                 paper=self.paper, citation=self.citation, reward=reward, config=self.config.to_public_dict(),
                                 key_fields=self.card_fields, metrics=metrics, extra_usage=self.model_card_extra_usage())

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload trl-gfn LoRA") -> Any:
        """Save the final weights and model card and upload exactly :meth:`final_files` to ``repo_id``."""
        if not repo_id:
            raise ValueError("push_to_hub: repo_id must be a non-empty Hub repository id such as 'me/my-lora'")
        folder = self.output_dir
        self.save_pretrained(folder)
        if self.accelerator.is_main_process:
            with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
                f.write(self.create_model_card(repo_id=repo_id))
            return upload_files(folder, self.final_files(), repo_id, private=private, token=token, commit_message=commit_message)
        return None


class TransitionTrainer(DiffusionRLTrainer):
    """Trainers that learn from individual transitions of recorded trajectories (Nabla-GFlowNet, DDPO).

    Subclasses implement :meth:`select_transitions` (which steps of each trajectory to train on) and
    :meth:`compute_loss` (the loss of one :class:`TransitionBatch`).
    """

    @property
    def backward_passes_per_micro_batch(self) -> int:
        return self.config.num_train_timesteps

    def select_transitions(self, samples: Trajectories, epoch: int, inner_epoch: int) -> torch.Tensor:
        """(B, num_train_timesteps) step indices to train on for each trajectory."""
        raise NotImplementedError

    def compute_loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch of transitions and its terms/diagnostics (detached scalars)."""
        raise NotImplementedError

    def prepare_training_samples(self, samples: Trajectories) -> Trajectories:
        """Hook to transform an epoch's samples before training (e.g. advantages); identity by default."""
        return samples

    def train_on_samples(self, samples: Trajectories | None, epoch: int, global_step: int) -> int:
        c, acc = self.config, self.accelerator
        samples = self.prepare_training_samples(samples)
        for inner in range(c.train_num_inner_epochs):
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(sample_seed(c.seed, epoch, inner, acc.process_index)))
            shuffled = samples.select(order)
            steps = self.select_transitions(shuffled, epoch, inner)
            info: dict[str, list[float]] = defaultdict(list)
            batches = range(0, len(shuffled), c.train_batch_size)
            bar = tqdm(batches, desc=f"Epoch {epoch}.{inner}: training", disable=self.hide_progress, leave=False)
            loss_sum = torch.zeros((), device=acc.device)
            for start in bar:
                part = shuffled.select(list(range(start, start + c.train_batch_size)))
                for j in range(steps.shape[1]):
                    batch = TransitionBatch.from_trajectories(part, steps[start:start + c.train_batch_size, j])
                    with self.accumulate():
                        loss, terms = self.compute_loss(batch)
                        acc.backward(loss)
                        loss_sum = loss_sum + loss.detach()
                        for k, v in terms.items():
                            info[k].append(float(v))
                        stepped = self.optimizer_step(loss_sum, epoch)
                    if stepped is not None:
                        global_step += 1
                        self.state.global_step = global_step
                        keys = list(info)
                        means = torch.tensor([float(np.mean(info[k])) for k in keys], device=acc.device)
                        logs = dict(zip(keys, acc.reduce(means, reduction="mean").tolist())) if keys else {}
                        logs.update(stepped)
                        logs.update({"epoch": epoch, "inner_epoch": inner})
                        self.log(logs, step=global_step)
                        info = defaultdict(list)
                        loss_sum = torch.zeros((), device=acc.device)
        return global_step


def _has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """Tracker-friendly config: lists and dicts as strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in config.items()}


__all__ = ["CHECKPOINT_PATTERN", "CheckpointError", "DiffusionRLTrainer", "TrainableModules", "TrainingState", "TransitionTrainer",
           "resolve_resume_path", "sample_seed"]
