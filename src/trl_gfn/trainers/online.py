"""The online loop of the reward trainers: prompts, sampling, rewards (:class:`DiffusionRLTrainer`), and the
per-transition training loop of DDPO and Nabla-GFlowNet (:class:`TransitionTrainer`), on top of
:class:`~trl_gfn.trainers.base.BaseDiffusionTrainer`."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..configs.base import DiffusionRLConfig
from ..pipelines import DiffusionPipelineForRL, Trajectories, TransitionBatch
from ..prompts import PromptSource
from ..rewards.base import validate_rewards
from .base import BaseDiffusionTrainer, _pipeline_and_prompts, sample_seed
from .checkpoints import crash_point


class DiffusionRLTrainer(BaseDiffusionTrainer):
    """Base class of the online trainers: each epoch samples from the policy, scores the samples with a reward, trains.

    A method subclasses it and provides only what differs: its config class, the extra trainable modules it needs
    (:meth:`build_modules`), its parameter groups, and how it trains on an epoch's samples (:meth:`train_on_samples`,
    usually through :class:`TransitionTrainer`'s loop and its own :meth:`compute_loss`).

    Args:
        config: the method's config dataclass.
        reward_function: ``reward_fn(images, prompts, prompt_metadata) -> (rewards, metadata)``; an
            ``nn.Module`` is moved to the device, frozen and kept in float32.
        pipeline: a :class:`DiffusionPipelineForRL` (a plain ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` is wrapped).
        prompt_function: a callable ``() -> (prompt, metadata)``, a list of prompts, a ``datasets.Dataset``
            with a ``prompt`` column, or a prompt-set name; default ``config.prompt_set``.
        image_samples_hook: optional ``hook(image_data, global_step, tracker)`` called on the main process every
            ``log_image_freq`` epochs with what :meth:`image_hook_data` returns (TRL's structures) and the first
            tracker (None without ``log_with``).

    TRL's argument order ``(config, reward_function, prompt_function, sd_pipeline, image_samples_hook)`` and its
    ``sd_pipeline=`` keyword are accepted too: the pipeline is recognised by its type.
    """

    config_class: type[DiffusionRLConfig] = DiffusionRLConfig
    method_name: str = "diffusion RL"
    #: whether the method differentiates the reward w.r.t. the images
    needs_reward_gradient: bool = True
    #: config fields shown in the model card
    card_fields: list[str] = ["sample_num_steps", "sample_guidance_scale", "sampler", "lora_rank", "train_learning_rate",
                              "num_epochs", "sample_batch_size", "train_batch_size"]

    def __init__(
        self,
        config: DiffusionRLConfig,
        reward_function: Callable,
        pipeline: DiffusionPipelineForRL | None = None,
        prompt_function: Any = None,
        image_samples_hook: Callable | None = None,
        *,
        sd_pipeline: Any = None,
    ) -> None:
        pipeline, prompt_function = _pipeline_and_prompts(pipeline, prompt_function, sd_pipeline)
        if not callable(reward_function):
            raise TypeError(f"reward_function must be callable (images, prompts, metadata) -> (rewards, metadata), got {type(reward_function).__name__}")
        self.reward_fn = reward_function
        self.prompt_function = prompt_function
        self.image_samples_hook = image_samples_hook
        #: per sampling batch of the last epoch: ``[images, prompts, prompt_metadata, rewards, reward_metadata]`` (TRL DDPO's hook data)
        self.sampled_batches: list[list[Any]] = []
        super().__init__(config, pipeline)

    def setup_components(self) -> None:
        """The sampler's transition schedule (``sampler="auto"``: the model family's stochastic sampler; settings that do not
        apply to the family are refused, :meth:`DiffusionRLConfig.resolve_sampler`), and the reward module on the device
        (frozen, float32)."""
        c, device = self.config, self.accelerator.device
        #: the sampler actually used (``config.sampler``, or the family's for ``auto``)
        self.sampler = c.resolve_sampler(self.pipeline.family.default_sampler)
        self.schedule = self.pipeline.make_schedule(self.sampler, c.sample_num_steps, c.sample_eta, c.sample_noise_level)
        if isinstance(self.reward_fn, torch.nn.Module):
            self.reward_fn.to(device=device, dtype=torch.float32)
            self.reward_fn.requires_grad_(False)
            self.reward_fn.eval()

    def finish_setup(self) -> None:
        """The prompt source; with a gradient-based method, a probe of the reward's differentiability."""
        c = self.config
        self.prompt_source = PromptSource(self.prompt_function if self.prompt_function is not None else c.prompt_set, seed=c.seed)
        if self.needs_reward_gradient:
            self.probe_reward_gradient()

    def train_on_samples(self, samples: Trajectories | None, epoch: int, global_step: int) -> int:
        """Train on one epoch's samples; return the new global step."""
        raise NotImplementedError

    @property
    def samples_needed(self) -> bool:
        """Whether the epoch begins by sampling trajectories without gradient (all but direct backprop methods)."""
        return True

    def probe_reward_gradient(self) -> None:
        """Fail at start-up, not after the first sampling epoch, if the reward cannot be differentiated w.r.t. the images.

        A reward declaring ``differentiable = False`` is refused; otherwise it is called once on one random image of the
        pipeline's output size with a prompt of the prompt source, and its gradient w.r.t. the image must exist and be finite.
        """
        name = getattr(self.reward_fn, "name", None) or getattr(self.reward_fn, "__name__", None) or type(self.reward_fn).__name__
        me = type(self).__name__
        if getattr(self.reward_fn, "differentiable", True) is False:
            raise ValueError(f"reward_function: {name} is not differentiable (differentiable=False), but {me} back-propagates the reward "
                             "into the images; use DDPOTrainer for non-differentiable rewards")
        _, h, w = self.pipeline.latent_shape
        scale = 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)
        generator = torch.Generator().manual_seed(sample_seed(self.config.seed, 997))
        images = torch.rand(1, 3, h * scale, w * scale, generator=generator).to(self.accelerator.device).requires_grad_(True)
        prompts, metadata = self.prompt_source([0], 0)
        try:
            with torch.enable_grad():
                rewards, _ = self.compute_rewards(images, prompts, metadata, need_grad=True)
                (grad,) = torch.autograd.grad(rewards.sum(), images, allow_unused=True)
        except (ValueError, TypeError, RuntimeError) as err:
            raise ValueError(f"reward_function: {me} differentiates the reward w.r.t. the images, and a probe call at start-up "
                             f"(one random {h * scale}x{w * scale} image, prompt {prompts[0]!r}) failed: {err}") from err
        if grad is None or not bool(torch.isfinite(grad).all()):
            raise ValueError(f"reward_function: {name}'s rewards have {'no' if grad is None else 'a non-finite'} gradient w.r.t. the images "
                             f"(probe at start-up, prompt {prompts[0]!r}); {me} needs a differentiable reward. Use DDPOTrainer otherwise.")

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
        self.sampled_batches = []
        for traj, scored in zip(parts, pending):
            traj.rewards, reward_metadata = scored()
            self.sampled_batches.append([traj.images, list(traj.prompts), list(traj.prompt_metadata), traj.rewards, reward_metadata])
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

    def start_scoring(self, traj: Trajectories) -> Callable[[], tuple[torch.Tensor, dict]]:
        """Begin scoring a sampled batch; returns a function that gives its ``(rewards, reward_metadata)``.

        Scores at once here; DDPO's ``async_reward_computation`` overrides it to overlap scoring with sampling.
        """
        scored = self.score_no_grad(traj.images, traj.prompts, traj.prompt_metadata)
        return lambda: scored

    def score_no_grad(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> tuple[torch.Tensor, dict]:
        """``(rewards, reward_metadata)`` without gradient (grad mode is thread-local, so it is set here, also in worker threads)."""
        with torch.no_grad():
            return self.compute_rewards(images, prompts, metadata, need_grad=False)

    def batch_sample_ids(self, batch_index: int, batch_size: int) -> list[int]:
        """Global sample ids of this process's ``batch_index``-th batch of ``batch_size`` (same set for any process count)."""
        acc = self.accelerator
        return [(batch_index * acc.num_processes + acc.process_index) * batch_size + j for j in range(batch_size)]

    def sample_generators(self, epoch: int, ids: Sequence[int]) -> list[torch.Generator]:
        """One generator per sample, seeded by (seed, epoch, sample id) only."""
        return [torch.Generator(device=self.accelerator.device).manual_seed(sample_seed(self.config.seed, epoch, i)) for i in ids]

    def draw_prompts(self, ids: Sequence[int], epoch: int) -> tuple[list[str], list[dict]]:
        """Prompts and metadata of the samples ``ids`` of ``epoch`` (one draw each; DDPO's ``sample_group_size`` draws
        one per group of samples instead)."""
        return self.prompt_source(ids, epoch)

    def sample_batch(self, epoch: int, batch_index: int, decode: bool = True) -> Trajectories:
        """Sample (no gradient, not scored) this process's ``batch_index``-th batch of the epoch, with ``sample_ids`` set
        (and ``images`` if ``decode``)."""
        c, acc = self.config, self.accelerator
        ids = self.batch_sample_ids(batch_index, c.sample_batch_size)
        prompts, metadata = self.draw_prompts(ids, epoch)
        self.note_prompts(prompts)
        traj = self.pipeline.sample(prompts, self.schedule, guidance_scale=c.sample_guidance_scale, negative_prompt=c.negative_prompts,
                                    prompt_metadata=metadata, generators=self.sample_generators(epoch, ids), decode=decode)
        traj.sample_ids = torch.tensor(ids, device=acc.device)
        return traj

    @torch.no_grad()
    def sample_reference(self, prompts: Sequence[str], metadata: Sequence[dict], seeds: Sequence[int]) -> Trajectories:
        """Trajectories of the reference model (adapter off) for ``prompts``, one generator per seed, with the policy's
        sampling settings (schedule, CFG, negative prompt), decoded but not scored."""
        c = self.config
        generators = [torch.Generator(device=self.accelerator.device).manual_seed(s) for s in seeds]
        with self.pipeline.reference_mode():
            return self.pipeline.sample(list(prompts), self.schedule, guidance_scale=c.sample_guidance_scale, negative_prompt=c.negative_prompts,
                                        prompt_metadata=list(metadata), generators=generators, decode=True)

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
            self.image_samples_hook(self.image_hook_data(samples), global_step, self.accelerator.trackers[0] if self.accelerator.trackers else None)

    def image_hook_data(self, samples: Trajectories) -> Any:
        """What ``image_samples_hook`` receives: as TRL's DDPOTrainer passed it, one
        ``[images, prompts, prompt_metadata, rewards, reward_metadata]`` per sampling batch of the epoch (this process's)."""
        return list(self.sampled_batches)

class TransitionTrainer(DiffusionRLTrainer):
    """Trainers that learn from individual transitions of recorded trajectories (Nabla-GFlowNet, DDPO).

    Subclasses implement :meth:`select_transitions` (which steps of each trajectory to train on) and
    :meth:`compute_loss` (the loss of one :class:`TransitionBatch`). A loss must be a mean over the batch's rows (a term
    that only some rows have is summed over them and divided by the row count), so that ``train_pack_timesteps`` —
    all of a micro-batch's transitions in one batch — gives the gradient of the accumulated unpacked micro-batches.
    """

    @property
    def backward_passes_per_micro_batch(self) -> int:
        return 1 if self.config.train_pack_timesteps else self.config.num_train_timesteps

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
            batches = range(0, len(shuffled), c.train_batch_size)
            bar = tqdm(batches, desc=f"Epoch {epoch}.{inner}: training", disable=self.hide_progress, leave=False)
            self.start_updates()
            for start in bar:
                part = shuffled.select(list(range(start, start + c.train_batch_size)))
                chosen = steps[start:start + c.train_batch_size]
                if c.train_pack_timesteps:  # every selected transition in one call, ordered as the unpacked micro-batches
                    rows = torch.arange(len(part)).repeat(chosen.shape[1])
                    packed = TransitionBatch.from_trajectories(part, chosen.T.reshape(-1), rows=rows)
                    global_step = self.train_micro_batch(lambda: self.compute_loss(packed), epoch, global_step, inner_epoch=inner)
                    continue
                for j in range(chosen.shape[1]):
                    batch = TransitionBatch.from_trajectories(part, chosen[:, j])
                    global_step = self.train_micro_batch(lambda: self.compute_loss(batch), epoch, global_step, inner_epoch=inner)
        return global_step
