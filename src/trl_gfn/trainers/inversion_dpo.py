"""Inversion-DPO: the Diffusion-DPO family's losses on deterministic inverted trajectories (Li et al., ACM MM 2025).

Diffusion-DPO noises each image at one random timestep with random noise. Inversion-DPO instead inverts the winner and
the loser through the **reference** with N steps of the model's deterministic sampler (:func:`trl_gfn.diffusion.ode_invert`
over :func:`~trl_gfn.diffusion.deterministic_schedule`: DDIM with η = 0 on the UNet families, the Euler ODE on SD3; CFG
``inversion_guidance_scale``), and compares policy and reference on the states of that trajectory. Step i of the inverted
trajectory starts at the state x_i (timestep τ_i) and its target p*_i is the sampler's prediction (the noise ε̂, or SD3's
velocity) that takes x_i exactly to the next inverted state. Per image, the trajectory error of a model is

    E = (1/N) Σ_i w_i · mean‖p*_i − p̂(x_i, τ_i)‖²,        w_i = 1/(2ᾱ_{τ_i}) on ε̂,  ((1 − σ_i)² + σ_i²)/2 on a velocity

(:meth:`~trl_gfn.diffusion.NoiseLevel.inversion_weight`: the same weight on the VP-equivalent ε-error, finite at σ = 1;
estimated on ``inversion_train_steps`` stratified steps when set) and the logit is Diffusion-DPO's on these errors,
u = −(β/2)·[(E_θ,w − E_ref,w) − (E_θ,l − E_ref,l)]; docs/inversion_dpo.md derives the sign from the trajectory likelihood
ratio. The reference (adapter off) is frozen and the images are encoded with the VAE posterior mean, so each image's
trajectory and the reference's predictions on it are computed once and cached (``inversion_cache``).

Cost per pair and update (units of one UNet forward of one latent; CFG doubles every forward): K = trained steps,
g = 2 with guidance else 1: policy 2·K·g forwards + their backwards; first use of a pair: 2·2N·g reference forwards
without gradient (inversion, then the reference's predictions on the trajectory), cached afterwards.
``benchmarks/preference_cost.py`` counts them against Diffusion-DPO's 2 + 2 forwards + 2 backwards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..configs.inversion_dpo import InversionDPOConfig
from ..data.preference import PairBatch
from ..losses import preference as L
from ..diffusion import InvertedTrajectory, deterministic_schedule, ode_invert, trajectory_weights
from .diffusion_dpo import Denoised, DiffusionDPOTrainer

_CITATION = """@inproceedings{li2025inversiondpo,
  title     = {Inversion-{DPO}: Precise and Efficient Post-Training for Diffusion Models},
  author    = {Zejian Li and Yize Li and Chenye Meng and Zhongni Liu and Yang Ling and Shengyuan Zhang and Guang Yang and Changyuan Yang and Zeyu Yang and Lingyun Sun},
  booktitle = {ACM International Conference on Multimedia (ACM MM)},
  year      = {2025},
  eprint    = {2507.11554}
}"""


@dataclass
class TrajectoryInputs:
    """The trained steps of a batch of pairs: K steps per pair, shared by winner (w) and loser (l).

    ``states_*``, ``targets_*``, ``ref_eps_*``: (B, K, C, h, w) states x_i, prediction targets p*_i and the reference's guided
    predictions at x_i (ε̂, or the velocity on SD3); ``timesteps``: (B, K) τ_i; ``weights``: (B, K) the steps'
    :meth:`~trl_gfn.diffusion.NoiseLevel.inversion_weight`; ``prompt_embeds`` (B, L, D) or the family's conditioning.
    """

    states_w: torch.Tensor
    states_l: torch.Tensor
    targets_w: torch.Tensor
    targets_l: torch.Tensor
    ref_eps_w: torch.Tensor
    ref_eps_l: torch.Tensor
    timesteps: torch.Tensor
    weights: torch.Tensor
    prompt_embeds: torch.Tensor


def trajectory_error(eps: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted trajectory error (B,): mean over the K steps of w_i · mean over elements of (p̂ − p*)² (shapes (B, K, ...), weights (B, K))."""
    per_step = (eps - targets).pow(2).flatten(2).mean(dim=2)
    return (weights * per_step).mean(dim=1)


def stratified_steps(num_steps: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k sorted step indices in [0, num_steps), one drawn uniformly from each of k equal chunks (all steps when k == num_steps)."""
    if k >= num_steps:
        return torch.arange(num_steps)
    edges = torch.linspace(0, num_steps, k + 1)
    u = torch.rand(k, generator=generator)
    return (edges[:-1] + u * (edges[1:] - edges[:-1])).floor().long().clamp(max=num_steps - 1)


class InversionDPOTrainer(DiffusionDPOTrainer):
    """Fine-tune a LoRA with Inversion-DPO: the preference loss of ``config.loss_type`` over deterministically inverted trajectories
    (DDIM on SD 1.x/2.x and SDXL, the Euler ODE on SD3).

    Usage::

        trainer = InversionDPOTrainer(InversionDPOConfig(inversion_num_steps=40), pipeline, train_dataset, eval_dataset)
        trainer.train()
        trainer.push_to_hub("me/sd15-inversion-dpo-lora")

    Same arguments, data checks, logging, checkpoints, resume and Hub upload as :class:`DiffusionDPOTrainer`; evaluation
    (``eval/...``) uses the eval pairs' full inverted trajectories. Logged in addition: ``inversion/cached_images``.
    """

    config_class = InversionDPOConfig

    def __init__(self, config: InversionDPOConfig, pipeline, train_dataset, eval_dataset=None) -> None:
        super().__init__(config, pipeline, train_dataset, eval_dataset)
        base = "" if config.loss_type == "sigmoid" else f", {self.method_name} loss"
        self.method_name, self.method_tag = f"Inversion-DPO{base}", "inversion-dpo"
        self.paper = ("Li et al., *Inversion-DPO: Precise and Efficient Post-Training for Diffusion Models*, ACM MM 2025, arXiv:2507.11554"
                      + (f"; loss: {self.paper}" if base else ""))
        self.citation = _CITATION + "\n\n" + self.citation

    @property
    def card_fields(self) -> list[str]:  # type: ignore[override]
        return super().card_fields + ["inversion_num_steps", "inversion_guidance_scale", "inversion_train_steps"]

    def setup_components(self) -> None:
        """The DPO trainer's checks, then the deterministic schedule of the inversion (DDIM or the flow ODE, per the model's
        scheduler) and the per-step weights."""
        super().setup_components()
        c = self.config
        self.inversion_schedule = deterministic_schedule(self.pipeline.scheduler, c.inversion_num_steps, device=self.accelerator.device)
        self.step_weights = trajectory_weights(self.inversion_schedule).float()
        self.train_steps = c.inversion_train_steps or c.inversion_num_steps
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # the unconditional branch's conditioning, one row per image size (through the family: SDXL zeroes an empty prompt and
        # conditions on the size)
        self._negative: dict[tuple[int, int], Any] = {}

    # ------------------------------------------------------------------ guided predictions and the inversion
    def guided_eps(self, unet: torch.nn.Module, states: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Guided predictions of the inversion's sampler (float32; ε̂, or the velocity on SD3) at states (M, C, h, w), timesteps
        (M,) of the inversion schedule, prompt conditioning (M rows)."""
        size = tuple(d * self.pipeline.vae_scale_factor for d in states.shape[-2:])  # the images' size (SDXL's add_time_ids)
        if size not in self._negative:
            self._negative[size] = self.pipeline.family.encode_negative_prompt(None, 1, size).to(self.accelerator.device)
        negative = self._negative[size]
        schedule = self.inversion_schedule
        level = schedule.level(schedule.step_index(timesteps), like=states)
        return self.pipeline.guided_epsilon(unet, states, timesteps, embeds, negative.expand(states.shape[0], -1, -1),
                                            self.config.inversion_guidance_scale, level, schedule.prediction_type)

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, embeds: torch.Tensor) -> tuple[InvertedTrajectory, torch.Tensor]:
        """Invert clean latents (B, C, h, w) through the reference; returns the trajectory and the reference's predictions
        (B, N, C, h, w) at its states (2N guided reference forwards per latent)."""
        B, N = latents.shape[0], self.config.inversion_num_steps
        with self.pipeline.reference_mode():
            traj = ode_invert(lambda x, t: self.guided_eps(self.pipeline.denoiser, x, t, embeds), latents, self.inversion_schedule)
            states = traj.states.flatten(0, 1)
            t = self.inversion_schedule.timesteps.repeat(B)
            ref = self.guided_eps(self.pipeline.denoiser, states, t, embeds.repeat_interleave(N, dim=0)).view_as(traj.states)
        return traj, ref

    @staticmethod
    def image_key(caption: str, image: torch.Tensor) -> str:
        """Cache key of one image under one caption (content hash: the same image and caption give the same trajectory)."""
        digest = hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes())
        digest.update(caption.encode())
        return digest.hexdigest()

    def trajectories(self, images: torch.Tensor, captions: Sequence[str], embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(states, targets, reference predictions), each (B, N, C, h, w) on the device, from the cache or computed now."""
        device, keys = self.accelerator.device, [self.image_key(c, im) for c, im in zip(captions, images)]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh: dict[int, tuple[torch.Tensor, ...]] = {}
        if todo:
            latents = self.pipeline.encode_images(images[todo].to(device), posterior_mean=True)
            traj, ref = self.invert(latents, embeds[todo])
            for j, i in enumerate(todo):
                fresh[i] = (traj.states[j].cpu(), traj.targets[j].cpu(), ref[j].cpu())
                if self.config.inversion_cache:
                    self._cache[keys[i]] = fresh[i]
        parts = [fresh[i] if i in fresh else self._cache[k] for i, k in enumerate(keys)]
        return tuple(torch.stack([p[n] for p in parts]).to(device) for n in range(3))

    def make_pair_inputs(self, batch: PairBatch, generators: Sequence[torch.Generator]) -> TrajectoryInputs:  # type: ignore[override]
        """The inverted trajectories of winners and losers and, per pair, the K trained steps (from the pair's generator)."""
        device = self.accelerator.device
        embeds = self.pipeline.encode_prompts(batch.captions, image_size=tuple(batch.winners.shape[-2:])).to(device)  # SDXL: size ids
        states_w, targets_w, ref_w = self.trajectories(batch.winners, batch.captions, embeds)
        states_l, targets_l, ref_l = self.trajectories(batch.losers, batch.captions, embeds)
        N, K = self.config.inversion_num_steps, self.train_steps
        idx = torch.stack([stratified_steps(N, K, g) for g in generators]).to(device)  # (B, K)

        def pick(x: torch.Tensor) -> torch.Tensor:
            return torch.gather(x, 1, idx.view(*idx.shape, 1, 1, 1).expand(-1, -1, *x.shape[2:]))

        return TrajectoryInputs(pick(states_w), pick(states_l), pick(targets_w), pick(targets_l), pick(ref_w), pick(ref_l),
                                self.inversion_schedule.timesteps.to(device)[idx], self.step_weights.to(device)[idx], embeds)

    # ------------------------------------------------------------------ errors
    def denoise(self, unet: torch.nn.Module, inputs: TrajectoryInputs) -> Denoised:  # type: ignore[override]
        """Guided UNet calls on the K trained states of every winner and loser (``inversion_steps_per_call`` steps per call, all K
        in one by default); weighted trajectory errors."""
        B, K = inputs.timesteps.shape
        per_call = self.config.inversion_steps_per_call or K
        parts = []
        for k0 in range(0, K, per_call):
            steps = slice(k0, min(k0 + per_call, K))
            n = steps.stop - steps.start
            states = torch.cat([inputs.states_w[:, steps], inputs.states_l[:, steps]]).flatten(0, 1)
            embeds = inputs.prompt_embeds.repeat(2, 1, 1).repeat_interleave(n, dim=0)
            eps = self.guided_eps(unet, states, inputs.timesteps[:, steps].repeat(2, 1).flatten(), embeds)
            parts.append(eps.view(2 * B, n, *states.shape[1:]))
        eps_w, eps_l = torch.cat(parts, dim=1).chunk(2)
        return Denoised(trajectory_error(eps_w, inputs.targets_w, inputs.weights), trajectory_error(eps_l, inputs.targets_l, inputs.weights),
                        eps_w, eps_l)

    @torch.no_grad()
    def reference_errors(self, inputs: TrajectoryInputs) -> Denoised:  # type: ignore[override]
        """The reference's errors from its cached predictions on the trajectory (no UNet call)."""
        return Denoised(trajectory_error(inputs.ref_eps_w, inputs.targets_w, inputs.weights),
                        trajectory_error(inputs.ref_eps_l, inputs.targets_l, inputs.weights), inputs.ref_eps_w, inputs.ref_eps_l)

    def preference_loss(self, errors: L.PairErrors, others, batch: PairBatch):  # type: ignore[override]
        """The loss of ``config.loss_type``; with ``inversion_sign='released'`` on the negated logit (winner and loser errors
        swapped, which negates u for every loss type). Logged logits and accuracies keep the derived sign."""
        if self.config.inversion_sign == "released":
            errors = L.PairErrors(errors.policy_l, errors.policy_w, errors.ref_l, errors.ref_w)
            others = [Denoised(o.err_l, o.err_w, o.pred_l, o.pred_w) for o in others]
        return super().preference_loss(errors, others, batch)

    def step(self, epoch: int, global_step: int) -> int:
        """The DPO trainer's epoch, then log how many images' trajectories are cached."""
        global_step = super().step(epoch, global_step)
        self.log({"inversion/cached_images": float(len(self._cache))}, step=global_step)
        return global_step

    def evaluate(self, pairs=None) -> dict[str, float]:
        """:meth:`DiffusionDPOTrainer.evaluate` on all N steps of each eval pair's trajectory (no subsampling)."""
        k, self.train_steps = self.train_steps, self.config.inversion_num_steps
        try:
            return super().evaluate(pairs)
        finally:
            self.train_steps = k


__all__ = ["InversionDPOTrainer", "TrajectoryInputs", "stratified_steps", "trajectory_error"]
