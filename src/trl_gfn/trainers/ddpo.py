"""DDPO: PPO-clip on the per-step log-probabilities of the sampler (Black et al., ICLR 2024).

The behaviour of TRL's former ``DDPOTrainer`` on the shared trl-gfn machinery: sample trajectories with
the current policy (DDIM η > 0), normalise the rewards into advantages (per prompt with a stat tracker,
or over the epoch's batch), then for ``train_num_inner_epochs`` passes train on ``int(K·f)`` randomly
chosen transitions of each trajectory with the clipped surrogate

    ratio = exp(log π_θ(x_{k-1}|x_k) − log π_old(x_{k-1}|x_k)),
    loss  = mean_b max(−A_b · ratio_b, −A_b · clip(ratio_b, 1 − ε, 1 + ε)),

where, as in TRL and ddpo-pytorch, the log-probability is the Gaussian log-density **averaged** over the
latent's elements. The reward is never differentiated, so any reward works (e.g. JPEG compressibility).
Cost per trained transition: one guided UNet forward and backward (≈ 3 units of a sampling step).

Flow-GRPO (Liu et al., 2025) on the same code: ``sample_group_size`` G samples per prompt, advantages
normalised within each group (``group_relative_advantages``) and, with ``kl_reference_scale`` = β_KL > 0, the
loss plus β_KL · KL(π_θ(·|x_k) ‖ π_ref(·|x_k)), the closed form of two Gaussian steps with the same σ_k.
"""

from __future__ import annotations

from collections import deque
from concurrent import futures
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object

from ..configs.ddpo import DDPOConfig
from ..diffusion import log_prob, step_mean
from ..pipelines import Trajectories, TransitionBatch
from .base import sample_seed
from .online import TransitionTrainer

CITATION = """@inproceedings{black2024training,
  title     = {Training Diffusion Models with Reinforcement Learning},
  author    = {Kevin Black and Michael Janner and Yilun Du and Ilya Kostrikov and Sergey Levine},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2305.13301}
}"""

LOSS_KEYS = ("loss", "approx_kl", "clipfrac", "ratio_mean", "advantage_abs_mean", "kl_reference")
GROUP_STD_EPSILON = 1e-4  # Flow-GRPO's: a group whose rewards are all equal gets advantage 0


class PerPromptStatTracker:
    """Per-prompt reward normalisation (DDPO's stat tracker): a buffer of each prompt's recent rewards.

    ``update(prompts, rewards)`` adds the rewards to their prompts' buffers (at most ``buffer_size`` each)
    and returns the advantages (r − mean) / (std + 1e-6) with the buffer's statistics, or the whole batch's
    when the buffer holds fewer than ``min_count`` values. Saved and restored with the checkpoints (as JSON).
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        prompts_arr = np.array(prompts, dtype=object)
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order
            mask = prompts_arr == prompt
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[mask] = (rewards[mask] - mean) / std
        return advantages

    def get_stats(self) -> dict[str, dict[str, float]]:
        return {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "count": len(v)} for k, v in self.stats.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {k: list(map(float, v)) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stats = state.get("stats") if isinstance(state, dict) else None
        valid = isinstance(stats, dict) and all(
            isinstance(prompt, str) and isinstance(values, list) and all(_finite_number(v) for v in values) for prompt, values in stats.items())
        if not valid:
            raise ValueError(f"per-prompt stat tracker state: expected {{'stats': {{prompt: [finite rewards]}}}}, got {str(state)[:200]}")
        self.stats = {k: deque(map(float, v), maxlen=self.buffer_size) for k, v in stats.items()}


def group_relative_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, over its group's std (population) + 1e-4. In float64: a
    group's rewards can differ in their last float32 digits."""
    values = rewards.double()
    advantages = torch.empty_like(values)
    for group in torch.unique(groups):
        rows = groups == group
        r = values[rows]
        advantages[rows] = (r - r.mean()) / (r.std(unbiased=False) + GROUP_STD_EPSILON)
    return advantages.to(rewards.dtype)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


class DDPOTrainer(TransitionTrainer):
    """Fine-tune a diffusion model's LoRA with DDPO (PPO-clip), the behaviour of TRL's former ``DDPOTrainer``.

    Usage::

        trainer = DDPOTrainer(DDPOConfig(...), JpegCompressibilityReward(), pipeline)
        trainer.train()

    The reward need not be differentiable. :meth:`compute_loss` returns the clipped loss of one batch of
    transitions with ``approx_kl`` and ``clipfrac`` (as TRL logged them).
    """

    config_class = DDPOConfig
    method_name = "DDPO"
    method_tag = "ddpo"
    paper = "Black et al., *Training Diffusion Models with Reinforcement Learning*, ICLR 2024, arXiv:2305.13301"
    citation = CITATION
    needs_reward_gradient = False
    card_fields = [*TransitionTrainer.card_fields, "train_timestep_fraction", "train_clip_range", "train_adv_clip_max", "train_cfg",
                   "per_prompt_stat_tracking", "train_num_inner_epochs", "sample_group_size", "group_relative_advantages",
                   "kl_reference_scale"]

    def __init__(self, config: DDPOConfig, reward_function, pipeline=None, prompt_function: Any = None, image_samples_hook=None, **kwargs):
        self.stat_tracker: PerPromptStatTracker | None = None
        if config.per_prompt_stat_tracking:
            self.stat_tracker = PerPromptStatTracker(config.per_prompt_stat_tracking_buffer_size, config.per_prompt_stat_tracking_min_count)
        self.executor = futures.ThreadPoolExecutor(max_workers=config.max_workers) if config.async_reward_computation else None
        super().__init__(config, reward_function, pipeline, prompt_function=prompt_function, image_samples_hook=image_samples_hook, **kwargs)

    def checkpoint_state(self) -> dict[str, Any]:
        """The per-prompt reward buffers (JSON in the checkpoint manifest: restored without unpickling anything)."""
        return {"stat_tracker": self.stat_tracker.state_dict()} if self.stat_tracker is not None else {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if self.stat_tracker is not None:
            self.stat_tracker.load_state_dict(state["stat_tracker"])

    # ------------------------------------------------------------------ sampling (optionally async rewards)
    def start_scoring(self, traj: Trajectories):
        """With ``async_reward_computation`` the rewards run in a thread pool while the next batch samples."""
        if self.executor is None:
            return super().start_scoring(traj)
        return self.executor.submit(self.score_no_grad, traj.images, traj.prompts, traj.prompt_metadata).result

    # ------------------------------------------------------------------ prompts in groups (GRPO)
    def draw_prompts(self, ids, epoch: int) -> tuple[list[str], list[dict]]:
        """One prompt per group of ``sample_group_size`` consecutive sample ids (group id = sample id // G), shared by
        the group's samples: the group's draw depends on (seed, epoch, group id) only, as a sample's does."""
        size = self.config.sample_group_size
        if size == 1:
            return super().draw_prompts(ids, epoch)
        groups = list(dict.fromkeys(int(i) // size for i in ids))
        prompts, metadata = self.prompt_source(groups, epoch)
        drawn = dict(zip(groups, zip(prompts, metadata)))
        return [drawn[int(i) // size][0] for i in ids], [dict(drawn[int(i) // size][1]) for i in ids]

    # ------------------------------------------------------------------ advantages
    def compute_advantages(self, samples: Trajectories) -> torch.Tensor:
        """Advantages of this process's samples, normalised over the samples of all processes (as TRL did).

        The gathered rewards are put in global sample-id order first, so that the statistics (and which values a full
        per-prompt buffer drops) are the same for any number of processes.
        """
        acc = self.accelerator
        rewards = acc.gather(samples.rewards.detach().float())
        ids = acc.gather(samples.sample_ids)
        order = torch.argsort(ids)
        rewards, ids = rewards[order], ids[order]
        if self.stat_tracker is not None:
            prompts = gather_object(list(samples.prompts)) if acc.num_processes > 1 else list(samples.prompts)
            prompts = [prompts[i] for i in order.tolist()]
            advantages = torch.as_tensor(self.stat_tracker.update(prompts, rewards.cpu().numpy()), dtype=torch.float32, device=rewards.device)
        elif self.config.group_relative_advantages:
            advantages = group_relative_advantages(rewards, ids // self.config.sample_group_size)
        else:
            advantages = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-8)
        position = {int(i): n for n, i in enumerate(ids.tolist())}
        local = torch.tensor([position[int(i)] for i in samples.sample_ids.tolist()], device=advantages.device)
        return advantages[local].to(samples.rewards.device)

    def prepare_training_samples(self, samples: Trajectories) -> Trajectories:
        samples.extras["advantages"] = self.compute_advantages(samples)
        return samples

    # ------------------------------------------------------------------ which transitions
    def select_transitions(self, samples: Trajectories, epoch: int, inner_epoch: int) -> torch.Tensor:
        """int(K·f) steps per trajectory: the first entries of a random permutation of the K steps (TRL's choice)."""
        c = self.config
        rows = []
        for sid in samples.sample_ids.tolist():
            gen = torch.Generator().manual_seed(sample_seed(c.seed, epoch, inner_epoch, sid, 23))
            rows.append(torch.randperm(c.sample_num_steps, generator=gen)[: c.num_train_timesteps])
        return torch.stack(rows).to(self.accelerator.device)

    # ------------------------------------------------------------------ the loss
    def transition_log_prob(self, batch: TransitionBatch, epsilon: torch.Tensor) -> torch.Tensor:
        """Per-sample log-density of x_{k-1} given x_k and a noise prediction, averaged over the latent's elements."""
        sched, x = self.schedule, batch.latents.float()
        idx = batch.step_index
        cx, ce, std = (sched.gather(name, idx, like=x) for name in ("coef_x", "coef_eps", "std"))
        mean = step_mean(x, epsilon, cx, ce)
        return log_prob(batch.next_latents.float(), mean, std) / x[0].numel()

    def policy_epsilon(self, batch: TransitionBatch, model=None) -> torch.Tensor:
        """The policy's noise prediction at x_k through the prepared model (or ``model``): guided if ``train_cfg``, else
        conditional only."""
        c, sched, x = self.config, self.schedule, batch.latents.float()
        idx = batch.step_index
        scale = c.sample_guidance_scale if c.train_cfg else 1.0
        return self.pipeline.guided_epsilon(model if model is not None else self.wrapped("unet"), x, sched.timesteps[idx], batch.prompt_embeds,
                                            batch.negative_prompt_embeds, scale, sched.level(idx, like=x), sched.prediction_type)

    def reference_kl(self, batch: TransitionBatch, epsilon: torch.Tensor) -> torch.Tensor:
        """Per-sample KL(π_θ(·|x_k) ‖ π_ref(·|x_k)) of the policy's step (noise prediction ``epsilon``) to the reference's
        (adapter off, the same guidance), averaged over the latent's elements like the log-probabilities.

        Both steps are N(μ, σ_k² I) with the same σ_k, so the KL is ‖μ_θ − μ_ref‖² / (2σ_k²), and μ_θ − μ_ref =
        coef_eps · (ε̂_θ − ε̂_ref) is taken from the noise difference (no cancellation of two large means).
        """
        with torch.no_grad(), self.pipeline.reference_mode():
            eps_ref = self.policy_epsilon(batch, model=self.local("unet"))
        idx, x = batch.step_index, batch.latents.float()
        ce, std = (self.schedule.gather(name, idx, like=x) for name in ("coef_eps", "std"))
        return ((ce * (epsilon.float() - eps_ref.float())) ** 2 / (2 * std**2)).flatten(1).mean(1)

    def compute_loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PPO-clip loss of a batch of transitions; ``batch.extras["advantages"]`` holds the advantages.

        The old log-probability is recomputed from the recorded sampling prediction ε̂_old (exactly the
        density the sampler drew x_{k-1} from), so nothing else needs storing.
        """
        c = self.config
        with torch.no_grad():
            old = self.transition_log_prob(batch, batch.epsilons.float())
        epsilon = self.policy_epsilon(batch)
        new = self.transition_log_prob(batch, epsilon)
        advantages = batch.extras["advantages"].float().clamp(-c.train_adv_clip_max, c.train_adv_clip_max)
        ratio = torch.exp(new - old)
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1.0 - c.train_clip_range, 1.0 + c.train_clip_range)
        loss = torch.maximum(unclipped, clipped).mean()
        kl_reference = torch.zeros_like(loss)
        if c.kl_reference_scale > 0:
            kl_reference = self.reference_kl(batch, epsilon).mean()
            loss = loss + c.kl_reference_scale * kl_reference
        with torch.no_grad():
            approx_kl = 0.5 * ((new - old) ** 2).mean()
            clipfrac = ((ratio - 1.0).abs() > c.train_clip_range).float().mean()
        terms = dict(zip(LOSS_KEYS, (loss.detach(), approx_kl, clipfrac, ratio.detach().mean(), advantages.abs().mean(),
                                     kl_reference.detach())))
        return loss, terms


__all__ = ["DDPOTrainer", "PerPromptStatTracker", "group_relative_advantages"]
