"""Nabla-GFlowNet: residual ∇-DB fine-tuning of a diffusion model's LoRA (DESIGN.md §2).

Cost per trained transition (units: one guided UNet forward without grad; a backward ≈ 2 units), as
implemented below:
- interior step, no reverse term: next-state reward gradient (UNet fwd + input backward at x_{k-1},
  VAE decode fwd+bwd, reward fwd+bwd) + reference forward at x_k (no grad) + policy forward and
  parameter backward at x_k;
- interior step, reverse term: + one extra backward through the policy UNet at x_k that yields both
  ∇_{x_k} log P_F^θ and the reward gradient at x_k, + a reference forward/backward at x_k;
- last step (x_1 → x_0): x̂_0(x_0) = x_0, so no UNet call at x_0 (the pathwise reverse term, default, still applies).
With ``memory_efficient_order`` (default) the UNet calls of the reward-gradient passes and the flow head are checkpointed
(+1 forward each) so that no two large graphs coexist. ``benchmarks/transition_cost.py`` measures time and memory.
"""

from __future__ import annotations

import contextlib
import warnings
from functools import partial
from typing import Any

import torch

from ..configs.nabla_gfn import NablaGFlowNetConfig
from ..diffusion import NoiseLevel, as_noise_level, log_ratio, predict_x0, score_residual, step_mean
from ..models import FlowHead
from ..pipelines import Trajectories, TransitionBatch
from .base import sample_seed
from .flow_critic import MonteCarloFlowCritic, rows_where, take_rows
from .online import TransitionTrainer
from .reference_flow import ReferenceFlowTraining

CITATION = """@inproceedings{liu2025nablagfn,
  title     = {Efficient Diversity-Preserving Diffusion Alignment via Gradient-Informed GFlowNets},
  author    = {Liu, Zhen and Xiao, Tim Z. and Liu, Weiyang and Bengio, Yoshua and Zhang, Dinghuai},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  eprint    = {2412.07775}
}"""

LOSS_KEYS = ("loss", "loss_forward", "loss_reverse", "loss_terminal", "loss_reg", "loss_critic", "norm_policy_residual",
             "norm_reward_guess", "norm_flow", "norm_forward_target", "loss_trajectory_balance", "loss_reg_anchor")
#: extras key of each trajectory's advantage A_τ for the trajectory-balance correction
TB_ADVANTAGE = "trajectory_balance_advantage"


class NablaGFlowNetTrainer(ReferenceFlowTraining, MonteCarloFlowCritic, TransitionTrainer):
    """Fine-tune a diffusion model's LoRA with Nabla-GFlowNet (residual ∇-DB).

    The sampled distribution is driven towards p_ref(x_0)·exp(β·r(x_0)): reward up, diversity and prior
    kept. Usage::

        trainer = NablaGFlowNetTrainer(NablaGFlowNetConfig(...), reward_fn, pipeline)
        trainer.train()
        trainer.push_to_hub("me/my-lora")

    :meth:`compute_loss` returns the loss of a batch of transitions and each of its terms, so the maths
    can be checked outside the training loop.
    """

    config_class = NablaGFlowNetConfig
    method_name = "Nabla-GFlowNet"
    paper = "Liu et al., *Efficient Diversity-Preserving Diffusion Alignment via Gradient-Informed GFlowNets*, ICLR 2025, arXiv:2412.07775"
    citation = CITATION
    card_fields = [*TransitionTrainer.card_fields, "reward_scale", "unet_reg_scale", "unet_reg_reference_reward_scale", "reverse_loss_scale", "pretrained_strength",
                   "use_flow_head", "train_timestep_fraction", "reward_gradient_scaling", "reward_gradient_saturation_reward_scale"]

    def __init__(self, config: NablaGFlowNetConfig, reward_function, pipeline, prompt_function: Any = None, image_samples_hook=None):
        self._previous_samples: Trajectories | None = None
        #: guess_clip_quantile: the current epoch's clipping norm (None: not clipping yet) and the interior ∇r norms seen
        self._guess_clip_threshold: float | None = None
        self._guess_norms: list[torch.Tensor] = []
        super().__init__(config, reward_function, pipeline, prompt_function=prompt_function, image_samples_hook=image_samples_hook)
        if config.mixed_precision in ("bf16", "fp16"):
            # measured (docs/memory.md, benchmarks/mixed_precision.py): interior transitions agree with float32 (LoRA-gradient
            # cosine 0.9997), the last one does not (forward loss 91x, cosine 0.85)
            warnings.warn(f"mixed_precision={config.mixed_precision!r}: at the last, nearly noise-free transitions the ∇-DB residual "
                          "coef_eps·(ε̂_θ − ε̂_ref)/σ² is dominated by the rounding of the two half-precision UNet passes (measured on CPU "
                          "bf16: forward loss 91x float32's, LoRA-gradient cosine 0.85 at σ = 0.02; interior transitions agree to "
                          "cosine 0.9997). See docs/memory.md, 'Mixed precision'; mixed_precision='no' avoids it.", stacklevel=2)

    # ------------------------------------------------------------------ modules and optimizer
    def build_modules(self) -> dict[str, torch.nn.Module]:
        c = self.config
        if not c.use_flow_head:
            return {}
        unet = self.pipeline.denoiser
        head = FlowHead(
            in_channels=unet.config.in_channels,
            block_out_channels=tuple(int(w) for w in c.flow_block_out_channels),
            layers_per_block=c.flow_layers_per_block,
            cross_attention_dim=self.pipeline.prompt_embed_dim,
            attention_head_dim=c.flow_attention_head_dim,
            sample_size=self.pipeline.latent_shape[-1],
            condition_on_prompt=c.flow_condition_on_prompt,
        )
        return {"flow_head": head.float()}

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        if self.config.use_flow_head:
            head = self.modules.flow_head
            groups.append({"params": [p for p in head.parameters() if p.requires_grad], "lr": self.config.flow_learning_rate,
                           "weight_decay": self.config.flow_weight_decay, "name": "flow_head"})
        return groups

    @property
    def flow_head(self) -> FlowHead | None:
        """The (unwrapped) flow head g_φ, or None when ``use_flow_head=False``."""
        return getattr(self.unwrapped, "flow_head", None)

    def model_card_extra_usage(self, repo_id: str = "<repo_id>") -> str:
        if not self.config.use_flow_head:
            return ""
        return ("\nThe learned residual flow-gradient head is in `flow_head/` "
                "(`trl_gfn.FlowHead.from_pretrained(repo_id, subfolder=\"flow_head\")`); it is not needed to sample.\n")

    # ------------------------------------------------------------------ which transitions
    def prepare_training_samples(self, samples: Trajectories) -> Trajectories:
        if self.config.trajectory_balance_scale > 0:
            samples.extras[TB_ADVANTAGE] = self.trajectory_balance_advantages(samples)
        if self.config.train_on_previous_samples:
            previous, self._previous_samples = self._previous_samples, samples
            samples = previous if previous is not None else samples
        if self.trains_flow_on_reference:
            samples = self.attach_reference_trajectories(samples, self.state.epoch)
        return samples

    @torch.no_grad()
    def trajectory_balance_advantages(self, samples: Trajectories) -> torch.Tensor:
        """A_τ = δ_τ − mean δ over the sampled batch (all processes), δ_τ = log P_old(τ)/P_ref(τ) − β r(x_0), for
        ``trajectory_balance_scale``: the sampling policy's log-ratio from the recorded ε̂_old and one reference forward per
        step (adapter off). Zero for every τ exactly when the sampler is p_ref·exp(β r) up to its normaliser."""
        c, sched = self.config, self.schedule
        if samples.rewards is None:
            raise RuntimeError("trajectory_balance_scale > 0 needs the sampled trajectories' rewards")
        delta = torch.zeros(len(samples), device=samples.latents.device)
        for start in range(0, len(samples), c.train_batch_size):
            part = samples.select(torch.arange(start, min(start + c.train_batch_size, len(samples))))
            for i in range(sched.num_steps):
                batch = TransitionBatch.from_trajectories(part, torch.full((len(part),), i, dtype=torch.long, device=part.latents.device))
                x, x_next, idx, last, inter, t, a, cx, ce, std = self._transition(batch)
                with self.pipeline.reference_mode():
                    eps_ref = self._guided(self.local("unet"), x, t, batch, None, a)
                eps_old = batch.epsilons.float()
                delta[start:start + len(part)] += log_ratio(x_next, step_mean(x, eps_old, cx, ce), eps_old, eps_ref, ce, std).to(delta.device)
        delta = delta - self.reward_scale_now * samples.rewards.float().to(delta.device)
        everyone = self.accelerator.gather(delta)
        self.log({"trajectory_balance_delta_std": everyone.std(unbiased=False).item()}, step=self.state.global_step)
        return delta - everyone.mean()

    def _trajectory_balance_loss(self, batch: TransitionBatch, x, x_next, eps, cx, ce, std, weight) -> torch.Tensor:
        """μ·mean_b A_b·log P_θ(x_{k-1}|x_k) (per element, times the transition weight; A held fixed): the trained transitions'
        share of ∇ Var_τ[log P_θ(τ)/P_ref(τ) − β r] (``trajectory_balance_scale``). x' − μ_θ is formed from the recorded
        sample noise and the noise difference, not as a difference of two nearby states."""
        c = self.config
        if c.trajectory_balance_scale == 0:
            return x.new_zeros(())
        advantage = batch.extras[TB_ADVANTAGE].float().to(x.device)
        d = (x_next - step_mean(x, batch.epsilons.float(), cx, ce)) - ce * (eps - batch.epsilons.float())
        log_p = -0.5 * (weight * d**2 / std**2).flatten(1).mean(1)
        return c.trajectory_balance_scale * (advantage * log_p).mean()

    def select_transitions(self, samples: Trajectories, epoch: int, inner_epoch: int) -> torch.Tensor:
        """int(K·f)+1 steps per trajectory: every interior pick first (stratified or uniform), the last step last."""
        c = self.config
        K, n = c.sample_num_steps, c.num_train_timesteps
        rows = []
        for sid in samples.sample_ids.tolist():
            gen = torch.Generator().manual_seed(sample_seed(c.seed, epoch, inner_epoch, sid, 17))
            m = n - 1
            if m == K - 1:
                interior = torch.arange(K - 1)
            elif c.low_var_subsampling:
                edges = torch.linspace(0, K - 1, m + 1)
                lo, hi = edges[:-1].floor().long(), edges[1:].floor().long()
                interior = lo + (torch.rand(m, generator=gen) * (hi - lo).clamp(min=1)).long()
            else:
                interior = torch.randperm(K - 1, generator=gen)[:m].sort().values
            rows.append(torch.cat([interior, torch.tensor([K - 1])]))
        return torch.stack(rows).to(self.accelerator.device)

    # ------------------------------------------------------------------ the loss
    def _guided(self, unet, latents, timesteps, batch: TransitionBatch, rows: torch.Tensor | None, alpha_bar: NoiseLevel) -> torch.Tensor:
        pos, neg = batch.prompt_embeds, batch.negative_prompt_embeds
        if rows is not None:
            pos, neg = pos[rows], neg[rows]
        return self.pipeline.guided_epsilon(unet, latents, timesteps, pos, neg, self.config.sample_guidance_scale, alpha_bar,
                                            self.schedule.prediction_type)

    def _gamma(self, level: NoiseLevel | torch.Tensor, reward_scale: float | None = None) -> torch.Tensor:
        """γ_k of states at noise level ``level`` (a :class:`NoiseLevel`, or a tensor ᾱ) under ``reward_gradient_scaling``:
        signal², signal, or the saturating signal²/(signal² + (β/β_c)·noise²) at β = ``reward_scale`` (default: the
        current update's β, :attr:`reward_scale_now`)."""
        c = self.config
        saturation = 1.0
        if c.reward_gradient_scaling == "saturating":
            beta = self.reward_scale_now if reward_scale is None else reward_scale
            saturation = beta / c.reward_gradient_saturation_reward_scale
        return as_noise_level(level).gamma(c.reward_gradient_scaling, saturation)

    @property
    def reward_scale_now(self) -> float:
        """β of the current optimizer update: the config's, or with ``reward_scale_warmup_updates`` = N its ramp
        β·min(1, (u + 1)/N) at update u."""
        c = self.config
        if c.reward_scale_warmup_updates == 0:
            return c.reward_scale
        return c.reward_scale * min(1.0, (self.state.global_step + 1) / c.reward_scale_warmup_updates)

    def _output_regularisers(self, eps: torch.Tensor, eps_ref: torch.Tensor, batch: TransitionBatch) -> tuple[torch.Tensor, ...]:
        """``(weighted sum, loss_reg, loss_anchor)``: the trust region mean‖ε̂_θ − ε̂_old‖² and the anchor mean‖ε̂_θ − ε̂_ref‖²
        (logged unweighted), each weighted by its λ times :meth:`regulariser_scaling` at the current (possibly annealed) β_u."""
        c = self.config
        scaling = self.regulariser_scaling(batch.step_index, like=eps)
        zero = eps.new_zeros(())
        sq_reg = (eps - batch.epsilons.float()) ** 2 if c.unet_reg_scale > 0 else None
        sq_anchor = (eps - eps_ref) ** 2 if c.unet_anchor_reg_scale > 0 else None
        loss_reg = sq_reg.mean() if sq_reg is not None else zero
        loss_anchor = sq_anchor.mean() if sq_anchor is not None else zero
        if isinstance(scaling, float):
            return scaling * (c.unet_reg_scale * loss_reg + c.unet_anchor_reg_scale * loss_anchor), loss_reg, loss_anchor
        # per-transition weights (the rows have equal element counts, so this is the weighted mean over rows)
        weighted_reg = (scaling * sq_reg).mean() if sq_reg is not None else zero
        weighted_anchor = (scaling * sq_anchor).mean() if sq_anchor is not None else zero
        return c.unet_reg_scale * weighted_reg + c.unet_anchor_reg_scale * weighted_anchor, loss_reg, loss_anchor

    def regulariser_scaling(self, step_index: torch.Tensor, *, like: torch.Tensor) -> float | torch.Tensor:
        """Factor on λ (and λ_ref) of the transitions leaving positions ``step_index``: 1 without
        ``unet_reg_reference_reward_scale`` β_λ; else the square of the guess's size at the current β relative to its size
        at β_λ, (β γ_k(β) / (β_λ γ_k(β_λ)))², γ_k at the transition's next state x_{k-1} (whose flow gradient is the forward
        target). For the ``squared`` and ``sqrt`` γ that is (β/β_λ)² at every step (a float); with ``saturating`` it
        depends on the step (a tensor broadcast like ``like``): at the noisy steps the guess no longer grows with β, and
        neither does the trust region that has to hold it."""
        c = self.config
        beta, beta_l = self.reward_scale_now, c.unet_reg_reference_reward_scale
        if beta_l is None or c.reward_gradient_scaling != "saturating" or beta == beta_l:
            return c.regulariser_scaling(beta)
        level = self.schedule.level(step_index + 1, like=like)
        ratio = (beta * self._gamma(level, beta)) / (beta_l * self._gamma(level, beta_l))
        return ratio.to(like.dtype) ** 2

    def _input_gradient_unet(self):
        """The UNet call of a pass that only yields an input gradient pulled back from ∇r (the guess): checkpointed with
        ``memory_efficient_order`` (its activations are not alive while the VAE decoder and the reward are differentiated;
        the VJP recomputes them), else as ``gradient_checkpointing`` says."""
        return self.local("unet", checkpoint=True if self.config.memory_efficient_order else None)

    def _guess_model(self):
        """Context in which the UNet is the model whose x̂_0 the flow-gradient guess uses (``flow_guess_model``)."""
        return self.pipeline.reference_mode() if self.config.flow_guess_model == "reference" else contextlib.nullcontext()

    @property
    def rewards_from_training(self) -> bool:
        """The last transition of every trajectory is trained and its guess is β γ_0 ∇r(x_0), which computes r(x_0): the
        samples need no decoding and scoring for the logged rewards (unless β = 0, training runs on the previous epoch's
        samples, or the trajectory-balance correction needs every reward before training)."""
        c = self.config
        return c.reward_scale > 0 and not c.train_on_previous_samples and c.trajectory_balance_scale == 0

    def reward_guess(self, latents: torch.Tensor, step_index: torch.Tensor, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
                     prompts: list, prompt_metadata: list, recorded_epsilon: torch.Tensor | None = None,
                     final_rewards: list | None = None) -> torch.Tensor:
        """The guessed flow gradient β γ ∇_x r(decode(x̂_0(x))) at states ``latents`` of sampling positions ``step_index``
        (0 = initial noise, K = final sample: there x̂_0 = x and no UNet is called).

        x̂_0 comes from the ``flow_guess_model``'s guided noise prediction; the gradient flows through that UNet to
        x (input gradient only, every graph freed on return). With ``jacobian_free_reward_gradient`` the noise
        prediction is held constant (``recorded_epsilon`` for the policy, a no-grad reference forward otherwise).
        The rewards of the final states (position K) are appended to ``final_rewards`` if given.
        """
        c, sched = self.config, self.schedule
        x = latents.detach().float()
        if c.reward_scale == 0:
            return torch.zeros_like(x)
        K = sched.num_steps
        a = sched.level(step_index, like=x)
        grad = torch.zeros_like(x)
        final = step_index == K
        if final.any():
            grad[final], rewards = self.reward_gradient(x[final], rows_where(prompts, final), rows_where(prompt_metadata, final))
            if final_rewards is not None:
                final_rewards.append(rewards)
        inner = ~final
        if inner.any():
            xi, ai, ti = x[inner], a[inner], sched.timesteps[step_index[inner].clamp(max=K - 1)]
            emb, neg = prompt_embeds[inner], negative_prompt_embeds[inner]
            sub_prompts, sub_meta = rows_where(prompts, inner), rows_where(prompt_metadata, inner)
            guided = partial(self.pipeline.guided_epsilon, guidance_scale=c.sample_guidance_scale, alpha_bar=ai,
                             prediction_type=sched.prediction_type)
            if c.jacobian_free_reward_gradient:
                if c.flow_guess_model == "policy" and recorded_epsilon is not None:
                    eps = recorded_epsilon[inner].float()
                else:
                    with self._guess_model(), torch.no_grad():
                        eps = guided(self.pipeline.denoiser, xi, ti, emb, neg)
                g0 = self.guess_reward_gradient(predict_x0(xi, eps, ai), ai, sub_prompts, sub_meta)
                grad[inner] = g0 * ai.x0_jacobian()  # ∂x̂_0/∂x with the prediction held fixed
            else:
                xi = xi.requires_grad_(True)
                with torch.enable_grad(), self._guess_model():
                    x0 = predict_x0(xi, guided(self._input_gradient_unet(), xi, ti, emb, neg), ai)
                    g0 = self.guess_reward_gradient(x0, ai, sub_prompts, sub_meta)  # ∇_{x̂0} r on its own graph (VAE + reward freed)
                    (grad[inner],) = torch.autograd.grad((x0 * g0).sum(), xi)
        return self.reward_scale_now * self._gamma(a) * grad

    @torch.no_grad()
    def flow_gradient(self, latents: torch.Tensor, position: int, prompts: list[str], prompt_metadata: list | None = None, *,
                      include_flow_head: bool = True) -> torch.Tensor:
        """This trainer's estimate of ∇ log F̃ at states ``latents`` (B, C, h, w) of sampling position ``position``
        (0 = initial noise, K = final sample): the guess β γ ∇r(x̂_0(x)) plus, with the flow head, g_φ(x, τ)
        (g is 0 at x_0 by the boundary condition); with ``flow_estimator="monte_carlo"`` the flow head's part is the
        critic's ∇_x β·u_ψ (and the guess is 0 at interior states with ``value_baseline="none"``). Compare it with
        :func:`trl_gfn.evaluation.soft_value.soft_value_gradient`, the Monte-Carlo ground truth."""
        n = latents.shape[0]
        x = latents.detach().float().to(self.accelerator.device)
        metadata = list(prompt_metadata) if prompt_metadata is not None else [{} for _ in range(n)]
        emb = self.pipeline.encode_prompts(list(prompts))
        neg = self.pipeline.encode_negative_prompt(self.config.negative_prompts, n)
        idx = torch.full((n,), position, dtype=torch.long, device=x.device)
        mc = self.config.flow_estimator == "monte_carlo"
        if mc and self.config.value_baseline == "none" and position < self.schedule.num_steps:
            out = torch.zeros_like(x)
        else:
            out = self.reward_guess(x, idx, emb, neg, list(prompts), metadata)
        if include_flow_head and self.config.use_flow_head and position < self.schedule.num_steps:
            if mc:
                xi = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    (learned,) = torch.autograd.grad(self.log_flow(self.flow_head, xi, self.schedule.timesteps[idx], emb).sum(), xi)
                out = out + learned
            else:
                out = out + self.flow_head(x, self.schedule.timesteps[idx], emb).float()
        return out

    @torch.no_grad()
    def policy_score_residual(self, latents: torch.Tensor, position: int, prompts: list[str]) -> torch.Tensor:
        """s_θ − s_ref = (μ_θ − μ_ref)/σ² of the step leaving sampling position ``position`` at states ``latents``
        (the quantity the forward ∇-DB fits to the flow gradient of the next state)."""
        c, sched = self.config, self.schedule
        n = latents.shape[0]
        x = latents.detach().float().to(self.accelerator.device)
        idx = torch.full((n,), position, dtype=torch.long, device=x.device)
        a = sched.level(idx, like=x)
        emb = self.pipeline.encode_prompts(list(prompts))
        neg = self.pipeline.encode_negative_prompt(c.negative_prompts, n)
        guided = partial(self.pipeline.guided_epsilon, timesteps=sched.timesteps[idx], prompt_embeds=emb, negative_prompt_embeds=neg,
                         guidance_scale=c.sample_guidance_scale, alpha_bar=a, prediction_type=sched.prediction_type)
        eps = guided(self.pipeline.denoiser, x)
        with self.pipeline.reference_mode():
            eps_ref = guided(self.pipeline.denoiser, x)
        return score_residual(eps, eps_ref, sched.gather("coef_eps", idx, like=x), sched.gather("std", idx, like=x))

    def checkpoint_state(self) -> dict[str, Any]:
        state = super().checkpoint_state()
        if self.config.guess_clip_quantile < 1:
            state["guess_clip_threshold"] = self._guess_clip_threshold
        return state

    def train_on_samples(self, samples: Trajectories | None, epoch: int, global_step: int) -> int:
        self._guess_norms = []
        global_step = super().train_on_samples(samples, epoch, global_step)
        if self.config.guess_clip_quantile < 1 and self._guess_norms:
            norms = self.accelerator.gather(torch.cat(self._guess_norms).to(self.accelerator.device))
            self._guess_clip_threshold = float(torch.quantile(norms.double(), self.config.guess_clip_quantile))
            self.log({"guess_clip_threshold": self._guess_clip_threshold}, step=global_step)
        return global_step

    def clip_guess_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """``guess_clip_quantile``: record the per-sample norms of an interior guess's ∇r(x̂_0) and scale those above the
        previous epoch's q-quantile down to it (direction kept)."""
        if self.config.guess_clip_quantile == 1:
            return grad
        norms = grad.detach().flatten(1).norm(dim=1)
        self._guess_norms.append(norms.float().cpu())
        if self._guess_clip_threshold is None:
            return grad
        scale = (self._guess_clip_threshold / norms.clamp(min=1e-30)).clamp(max=1.0)
        return grad * scale.view(-1, *([1] * (grad.ndim - 1)))

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        if "guess_clip_threshold" in state:
            self._guess_clip_threshold = state["guess_clip_threshold"]
        if self.config.train_on_previous_samples:
            warnings.warn("train_on_previous_samples: checkpoints do not hold the previous epoch's samples; the first resumed "
                          "epoch trains on the samples it has just drawn", UserWarning, stacklevel=2)

    def _transition(self, batch: TransitionBatch) -> tuple[torch.Tensor, ...]:
        """``(x_k, x_{k-1}, step index, last-transition mask, interior mask, τ_k, noise level of x_k, coef_x, coef_eps, std)`` of
        a batch, float32, the per-step coefficients broadcast like x_k."""
        sched = self.schedule
        x, x_next, idx = batch.latents.float(), batch.next_latents.float(), batch.step_index
        last = idx == sched.num_steps - 1
        coefs = (sched.gather(name, idx, like=x) for name in ("coef_x", "coef_eps", "std"))
        return (x, x_next, idx, last, ~last, sched.timesteps[idx], sched.level(idx, like=x), *coefs)

    def _compute_loss_monte_carlo(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward ∇-DB with the flow gradient of a Monte-Carlo log-flow critic (``flow_estimator="monte_carlo"``,
        docs/nabla_gfn.md): s_θ − s·s_ref = ∇_x V_ψ(x_{k-1}) on interior transitions, β∇r(x_0) on the last; the critic is
        fitted in the same step (:meth:`critic_loss`) to reference rollouts from the interior next states."""
        c, sched = self.config, self.schedule
        x, x_next, idx, last, inter, t, a, cx, ce, std = self._transition(batch)
        strength = c.pretrained_strength
        emb, neg = batch.prompt_embeds, batch.negative_prompt_embeds
        zero = x.new_zeros(())
        # the exact β∇r(x_0) on last transitions; on interior ones the guess (value_baseline="guess") or 0, plus ∇_x β·u_ψ below
        final_rewards: list[torch.Tensor] = []
        if c.value_baseline == "guess":
            target = self.reward_guess(x_next, idx + 1, emb, neg, batch.prompts, batch.prompt_metadata, recorded_epsilon=batch.next_epsilons,
                                       final_rewards=final_rewards)
        else:
            target = torch.zeros_like(x)
            if bool(last.any()):
                target[last] = self.reward_guess(x_next[last], idx[last] + 1, emb[last], neg[last], rows_where(batch.prompts, last),
                                                 rows_where(batch.prompt_metadata, last), final_rewards=final_rewards)
        for rewards in final_rewards:
            self.record_training_rewards(rewards)
        guess_norm = target.detach().flatten(1).norm(dim=1).mean()
        loss_value = zero
        learned = torch.zeros_like(x)
        if bool(inter.any()) and c.reward_scale > 0:
            # interior: + ∇_x β·u_ψ(x_{k-1}) (an input gradient of the critic; detached)
            xi = x_next[inter].detach().requires_grad_(True)
            with torch.enable_grad():
                v = self.log_flow(self.flow_head, xi, sched.next_timesteps[idx[inter]], emb[inter])
                (learned[inter],) = torch.autograd.grad(v.sum(), xi)
            loss_value = self.fit_critic(x_next[inter], idx[inter] + 1, emb[inter], neg[inter], rows_where(batch.prompts, inter),
                                         rows_where(batch.prompt_metadata, inter)) * inter.float().mean()  # a mean over all rows
        target = target + learned
        with self.pipeline.reference_mode(), torch.no_grad():
            eps_ref = self._guided(self.local("unet"), x, t, batch, None, a)
        v_ref = (x_next - step_mean(x, eps_ref, cx, ce)) / std**2
        eps = self._guided(self.wrapped("unet"), x, t, batch, None, a)
        residual = score_residual(eps, eps_ref, ce, std) - (1 - strength) * v_ref
        weight = std**2 if c.transition_loss_weighting == "variance" else torch.ones_like(std)
        loss_forward = (weight * (residual - target) ** 2).mean()
        regularisers, loss_reg, loss_anchor = self._output_regularisers(eps, eps_ref, batch)
        loss_tb = self._trajectory_balance_loss(batch, x, x_next, eps, cx, ce, std, weight)
        loss = loss_forward + loss_value + regularisers + loss_tb

        def norm(v: torch.Tensor) -> torch.Tensor:
            return v.detach().flatten(1).norm(dim=1).mean()

        terms = dict(zip(LOSS_KEYS, (loss.detach(), loss_forward.detach(), zero, zero, loss_reg.detach(), loss_value.detach(), norm(residual),
                                     guess_norm, norm(learned), norm(target), loss_tb.detach(), loss_anchor.detach())))
        return loss, terms

    def compute_loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Residual ∇-DB loss of a batch of transitions x_k → x_{k-1} (docs/nabla_gfn.md, "The loss").

        Returns ``(loss, terms)`` with ``terms`` the detached scalars: ``loss_forward``, ``loss_reverse``,
        ``loss_terminal``, ``loss_reg`` and per-sample L2 norms of the policy score residual s_θ − s·s_ref,
        of the reward guess β·γ·∇r, of the flow head output at x_{k-1} and of the forward target.
        """
        if self.config.flow_estimator == "monte_carlo":
            return self._compute_loss_monte_carlo(batch)
        c, sched = self.config, self.schedule
        x, x_next, idx, last, inter, t, a, cx, ce, std = self._transition(batch)
        inter_f = inter.view(-1, 1, 1, 1).to(x.dtype)
        strength = c.pretrained_strength
        t_next = sched.next_timesteps[idx]
        use_flow = c.use_flow_head
        pathwise, backup = c.reverse_loss_type == "pathwise", c.reverse_loss_type == "reference"
        rev = torch.ones_like(inter) if pathwise or backup else inter  # states x_k whose flow the reverse term trains
        on_reference = use_flow and self.trains_flow_on_reference  # the flow head's terms on reference trajectories instead
        use_reverse = use_flow and c.reverse_loss_scale > 0 and bool(rev.any()) and not on_reference
        zero = x.new_zeros(())
        emb, neg = batch.prompt_embeds, batch.negative_prompt_embeds
        # the model whose x̂_0(x_k) the reverse term's guess at x_k differentiates the reward at (None: no such guess)
        guess_at_x = c.flow_guess_model if use_reverse and c.reward_scale > 0 else None

        # 1. guessed flow gradient at x_{k-1} first: input gradient only, its graph freed before any other graph exists
        final_rewards: list[torch.Tensor] = []
        if c.flow_target_rollouts > 0:  # Monte-Carlo target on interior transitions, the exact β∇r(x_0) on the last ones
            guess_next = torch.zeros_like(x)
            if bool(last.any()):
                guess_next[last] = self.reward_guess(x_next[last], idx[last] + 1, emb[last], neg[last], rows_where(batch.prompts, last),
                                                     rows_where(batch.prompt_metadata, last), final_rewards=final_rewards)
            if bool(inter.any()):
                guess_next[inter] = self.rollout_flow_target(x[inter], idx[inter], emb[inter], neg[inter], rows_where(batch.prompts, inter),
                                                             rows_where(batch.prompt_metadata, inter))
        else:
            guess_next = self.reward_guess(x_next, idx + 1, emb, neg, batch.prompts, batch.prompt_metadata, recorded_epsilon=batch.next_epsilons,
                                           final_rewards=final_rewards)
        for rewards in final_rewards:
            self.record_training_rewards(rewards)

        # 2. flow head at x_{k-1} (all rows: the last ones for the terminal term) and at the reverse term's x_k, one call.
        #    With memory_efficient_order it is checkpointed and runs before the UNets: the backward pass reaches it after the
        #    policy's graph is freed, and recomputes it then
        g_next = g_cur = None
        if on_reference:  # the forward target's flow head term only (detached there anyway)
            with torch.no_grad():
                g_next = self.flow_head(x_next, t_next, emb)
        elif use_flow:
            head = self.wrapped("flow_head", checkpoint=True if c.memory_efficient_order else None)
            g_next, g_cur = self.flow_head_at_states(head, batch, x, x_next, t, t_next, emb, rev if use_reverse else None)
        # ∇log F̃(x_{k-1}) with the flow head's value detached: what the reverse term carries back to x_k
        flow_next_detached = guess_next + g_next.detach() * inter_f if use_flow else guess_next

        # 3. reference at x_k (adapter off). With the reverse term: the reference side of the x_k-gradient, as one VJP
        #    (`pathwise` / `score`: s·∇_{x_k} log P_ref without its identity part; `reference`: J_refᵀ applied to the flow
        #    gradient at x_{k-1} without its identity part), minus the guess at x_k when the reference makes it
        xr = x.detach().requires_grad_(use_reverse)
        with self.pipeline.reference_mode(), torch.set_grad_enabled(use_reverse):
            eps_ref = self._guided(self._input_gradient_unet() if guess_at_x == "reference" else self.local("unet"), xr, t, batch, None, a)
            v_ref = (x_next - step_mean(x, eps_ref.detach(), cx, ce)) / std**2  # = −s_ref
            ref_side = None
            if use_reverse:
                vector = ce * flow_next_detached if backup else strength * ce * v_ref
                guess_rows, borrowed, prev = rev if guess_at_x == "reference" else None, None, None
                if guess_rows is not None and self.guess_next_is_guess_at_state:
                    # a state x_k that is another row's x_{k-1} already has its guess in guess_next: no second decode
                    prev = batch.previous_state_rows()
                    borrowed, guess_rows = rev & (prev >= 0), rev & (prev < 0)
                ref_side = self.reference_input_gradient(xr, eps_ref, a, vector, guess_rows, batch)
                if borrowed is not None and bool(borrowed.any()):
                    ref_side = ref_side - borrowed.view(-1, 1, 1, 1) * guess_next[prev.clamp(min=0)]
        eps_ref = eps_ref.detach()

        # 4. policy at x_k through the prepared model (parameter gradients synchronised across processes). When the policy
        #    makes the guess at x_k, ∇r at its x̂_0(x_k) is taken first, from a forward without grad (same values), so that
        #    the VAE and reward graphs are gone before the policy graph is built
        g0_policy = None
        if guess_at_x == "policy" and c.memory_efficient_order and not c.gradient_checkpointing:
            with torch.no_grad():
                x0_policy = predict_x0(x, self._guided(self.pipeline.denoiser, x, t, batch, None, a), a)
            g0_policy, _ = self.reward_guess_at_x0(x0_policy, rev, batch)
        policy_vjp = use_reverse and (not backup or guess_at_x == "policy")  # the reverse term needs ∇_{x_k} through the policy
        xp = x.detach().requires_grad_(policy_vjp)
        eps = self._guided(self.wrapped("unet"), xp, t, batch, None, a)
        # s_θ − s·s_ref from the noise difference (no cancellation of two large scores at small σ)
        residual = score_residual(eps, eps_ref, ce, std) - (1 - strength) * v_ref

        # 5. forward ∇-DB: s_θ − s·s_ref = g(x_{k-1}) + βγ∇r(x̂_0(x_{k-1})); no g on the last transition (g(x_0) = 0)
        flow_next = guess_next
        if use_flow:
            g_fwd = g_next if c.train_flow_head_on_forward_loss else g_next.detach()
            flow_next = flow_next + g_fwd * inter_f
        weight = std**2 if c.transition_loss_weighting == "variance" else torch.ones_like(std)
        # importance_weighting: per-transition w ∝ P*/P_old (held fixed) on the forward and reverse terms
        fit_weight = weight
        if c.importance_weighting == "linearised":
            fit_weight = weight * self.transition_importance_weights(x, x_next, idx, batch.epsilons.float(), eps_ref, flow_next_detached, cx, ce, std)
        loss_forward = (fit_weight * (residual - flow_next) ** 2).mean()
        # terms only some rows have: summed over those rows, divided by the batch's element count (a mean over rows)
        loss_terminal = (g_next[last] ** 2).sum() / g_next.numel() if use_flow and bool(last.any()) and not on_reference else zero

        # 6. reverse ∇-DB at x_k (trains g only). The policy side is ∇_{x_k} log P_θ(x_{k-1}|x_k), plus the guess at x_k
        #    when the policy makes it; `pathwise` adds −J_θᵀρ, ρ = flow(x_{k-1}) − residual (the forward residual's negative).
        #    Identity parts of the two x_k-scores are combined analytically: coef_x·(v_θ − s·v_ref) = −coef_x·residual.
        #    `reference`: the target is J_refᵀ·flow(x_{k-1}) minus the guess at x_k; the policy enters only through where
        #    x_{k-1} was sampled (and through its guess at x_k when the policy makes it)
        loss_reverse = zero
        if use_reverse:
            surrogate = None
            if not backup:
                v_theta = (x_next - step_mean(x, eps.detach(), cx, ce)) / std**2
                if pathwise:
                    rho = (flow_next_detached - residual.detach()) * rev.view(-1, 1, 1, 1).to(x.dtype)
                else:
                    rho = torch.zeros_like(x)
                surrogate = (eps * (ce * (v_theta - rho))).sum()
            if guess_at_x == "policy":
                x0 = predict_x0(xp, eps, a)
                if g0_policy is None:  # the policy graph is checkpointed, or the memory ordering is off
                    g0_policy, _ = self.reward_guess_at_x0(x0, rev, batch)
                surrogate = (g0_policy * x0).sum() + (0 if surrogate is None else surrogate)
            policy_side = torch.autograd.grad(surrogate, xp, retain_graph=True)[0] if policy_vjp else 0
            if backup:
                total = -cx * flow_next_detached + policy_side - ref_side
            else:
                total = -cx * (residual.detach() + rho) + policy_side - ref_side
            loss_reverse = (fit_weight[rev] * (total[rev] + g_cur) ** 2).sum() / total.numel()
        if on_reference:
            loss_reverse, loss_terminal, loss_forward_reference = self.reference_flow_terms(batch)
            if c.train_policy_on_reference_trajectories:  # the mean over both sets of rows
                loss_forward = 0.5 * (loss_forward + loss_forward_reference)

        # 7. output regularisers: the trust region around the sampling policy's guided prediction and, with
        #    unet_anchor_reg_scale, a pull towards the reference's (ε̂_ref of step 3)
        regularisers, loss_reg, loss_anchor = self._output_regularisers(eps, eps_ref, batch)

        # 8. trajectory-balance correction (trajectory_balance_scale): the global mode weights, from the sampled batch
        loss_tb = self._trajectory_balance_loss(batch, x, x_next, eps, cx, ce, std, weight)

        loss = loss_forward + c.reverse_loss_scale * loss_reverse + loss_terminal + regularisers + loss_tb

        def norm(v: torch.Tensor | None) -> torch.Tensor:
            return zero if v is None else v.detach().flatten(1).norm(dim=1).mean()

        terms = dict(zip(LOSS_KEYS, (loss.detach(), loss_forward.detach(), loss_reverse.detach(), loss_terminal.detach(),
                                     loss_reg.detach(), zero, norm(residual), norm(guess_next), norm(g_next), norm(flow_next),
                                     loss_tb.detach(), loss_anchor.detach())))
        if c.reward_scale_warmup_updates > 0:
            terms["reward_scale_now"] = x.new_tensor(self.reward_scale_now)
        return loss, terms

    def flow_head_at_states(self, head, batch: TransitionBatch, x: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                            emb, cur: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(g_φ at every row's x_{k-1}, g_φ at x_k of the rows ``cur`` (None: none))`` from one call of ``head``, each state
        once: a row's x_{k-1} that is the x_k of a row of ``cur`` (the same trajectory's next transition, packed in the same
        batch by ``train_pack_timesteps``) is read from that row's output. The values are the same, and so are the
        parameter gradients (the two uses of one output add up as the two outputs' would); the call is up to half the size."""
        if cur is None:
            return head(x_next, t_next, emb), None
        n = x.shape[0]
        cur_rows = cur.nonzero().squeeze(1)
        slot = torch.full((n,), -1, dtype=torch.long, device=x.device)
        slot[cur_rows] = torch.arange(cur_rows.numel(), device=x.device)
        succ = batch.next_state_rows().to(x.device)
        shared = torch.where(succ >= 0, slot[succ.clamp(min=0)], slot.new_full((), -1))  # index in g_cur of the row's x_{k-1}
        own = shared < 0
        n_own = int(own.sum())
        g = head(torch.cat([x_next[own], x[cur_rows]]), torch.cat([t_next[own], t[cur_rows]]), torch.cat([emb[own], emb[cur_rows]]))
        index = torch.where(own, torch.cumsum(own.long(), 0) - 1, n_own + shared)
        return g[index], g[n_own:]

    @property
    def guess_next_is_guess_at_state(self) -> bool:
        """Whether the forward target's guess at x_{k-1} is the same computation as the reverse term's guess at that state as
        x_k of the next transition (one sample of the guess model's x̂_0, no Jacobian-free shortcut, no clipping statistics),
        so that a packed batch can reuse it."""
        c = self.config
        return (c.flow_target_rollouts == 0 and not c.jacobian_free_reward_gradient and c.guess_posterior_samples == 1
                and c.guess_clip_quantile == 1)

    @torch.no_grad()
    def transition_importance_weights(self, x, x_next, idx, eps_old, eps_ref, flow_next, cx, ce, std) -> torch.Tensor:
        """``importance_weighting="linearised"``: per-transition weights w ∝ P*(x'|x)/P_old(x'|x), shape (B, 1, 1, 1).

        P* ∝ P_ref(x'|x)·F̃(x') is the ideal step whose expectation the forward and reverse targets need; x' was drawn from
        the sampling policy P_old (mean from the recorded ε̂_old). With log F̃ linearised around the sampling mean μ_old,
        log w = log P_ref(x'|x) − log P_old(x'|x) + f(x')·(x' − μ_old) up to a per-state constant (which does not change
        the pointwise minimiser), f = ``flow_next`` the current estimate of ∇ log F̃(x'). The log-weights are centred and
        clipped at ±``importance_log_weight_clip`` and the weights normalised to mean 1, per step index of the batch."""
        mean_old = step_mean(x, eps_old, cx, ce)
        log_w = -log_ratio(x_next, mean_old, eps_old, eps_ref, ce, std) + (flow_next.float() * (x_next - mean_old)).flatten(1).sum(1)
        weights = torch.ones_like(log_w)
        for k in idx.unique():
            rows = idx == k
            centred = (log_w[rows] - log_w[rows].mean()).clamp(-self.config.importance_log_weight_clip, self.config.importance_log_weight_clip)
            weights[rows] = centred.exp() / centred.exp().mean()
        return weights.view(-1, *([1] * (x.ndim - 1)))

    @torch.no_grad()
    def rollout_flow_target(self, latents: torch.Tensor, step_index: torch.Tensor, prompt_embeds, negative_prompt_embeds, prompts: list,
                            prompt_metadata: list) -> torch.Tensor:
        """``flow_target_rollouts`` = M: at states x_k (sampling positions ``step_index`` < K − 1) the Monte-Carlo estimate
        Σ_j w_j z_j / σ_k = (μ* − μ_ref(x_k))/σ_k² of the ideal transition's mean shift: M reference steps x'_j = μ_ref + σ_k z_j,
        each continued to x_0^j by the reference sampler (adapter off, the sampling CFG), w = softmax_j(β r(x_0^j))."""
        c, sched = self.config, self.schedule
        M, n = c.flow_target_rollouts, latents.shape[0]
        rows = torch.arange(n, device=latents.device).repeat_interleave(M)
        rewards, noise, _ = self.reference_chain(latents[rows], step_index[rows], prompt_embeds[rows], negative_prompt_embeds[rows],
                                                 take_rows(prompts, rows), take_rows(prompt_metadata, rows))
        weights = torch.softmax(self.reward_scale_now * rewards.float().view(n, M), dim=1).to(noise.device)
        std = sched.gather("std", step_index, like=latents).float()
        return (weights.view(n, M, *([1] * (latents.ndim - 1))) * noise.view(n, M, *latents.shape[1:])).sum(1) / std

    def reference_input_gradient(self, xr: torch.Tensor, eps_ref: torch.Tensor, level, vector: torch.Tensor, guess_rows: torch.Tensor | None,
                                 batch: TransitionBatch) -> torch.Tensor:
        """∇_x of Σ ε̂_ref(x)·``vector`` minus, on ``guess_rows`` (None or all False: none), the guess β γ ∇r(decode(x̂_0^ref(x))): one VJP
        through the reference call that made ``eps_ref`` from ``xr`` (noise level ``level``), the guess's VAE and reward
        graphs freed before it."""
        surrogate = (eps_ref * vector).sum()
        if guess_rows is not None and bool(guess_rows.any()):
            x0 = predict_x0(xr, eps_ref, level)
            g0, _ = self.reward_guess_at_x0(x0, guess_rows, batch)
            surrogate = surrogate - (g0 * x0).sum()
        (grad,) = torch.autograd.grad(surrogate, xr)
        return grad

    def reward_guess_at_x0(self, x0: torch.Tensor, rows: torch.Tensor, batch: TransitionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """β γ_k ∇r at the clean predictions ``x0`` of the states x_k of ``rows`` (zero elsewhere), detached: the vector of
        the VJP that turns it into the guess at x_k."""
        vec = torch.zeros_like(x0)
        a = self.schedule.level(batch.step_index, like=x0)
        g0, rewards = self.guess_reward_gradient(x0[rows].detach(), a[rows], rows_where(batch.prompts, rows), rows_where(batch.prompt_metadata, rows),
                                                 return_rewards=True)
        vec[rows] = self.reward_scale_now * self._gamma(a[rows]) * g0
        return vec, rewards

    def guess_reward_gradient(self, x0: torch.Tensor, alpha_bar: torch.Tensor | NoiseLevel, prompts: list, prompt_metadata: list, *,
                              return_rewards: bool = False):
        """∇r at the one-step predictions ``x0`` of states with ᾱ = ``alpha_bar`` (a tensor, or a :class:`NoiseLevel`, whose
        variance-preserving equivalent ᾱ is used) — with ``guess_posterior_samples`` M > 1,
        (1/β)∇ log mean_i exp(β r(x0 + sqrt(1 − ᾱ) ε_i)) = Σ_i w_i ∇r(x0 + sqrt(1 − ᾱ) ε_i), w = softmax_i(β r_i): the
        soft value under a Gaussian posterior around x0 rather than the reward at the blurry x0 itself. Detached input
        gradient; with ``return_rewards`` also r(x0) (M = 1) or the weighted mean of the r_i."""
        c = self.config
        M = c.guess_posterior_samples
        if M == 1:
            grad, rewards = self.reward_gradient(x0, prompts, prompt_metadata)
            grad = self.clip_guess_gradient(grad)
            return (grad, rewards) if return_rewards else grad
        n = x0.shape[0]
        std = (1 - as_noise_level(alpha_bar).alpha_bar).clamp(min=0).sqrt().reshape(n, *([1] * (x0.ndim - 1)))
        samples = x0.detach().unsqueeze(0) + std.unsqueeze(0) * torch.randn((M, *x0.shape), device=x0.device, dtype=x0.dtype)
        grads, rewards = self.reward_gradient(samples.flatten(0, 1), list(prompts) * M, list(prompt_metadata) * M)
        grads, rewards = grads.view(M, *x0.shape), rewards.view(M, n)
        weights = torch.softmax(self.reward_scale_now * rewards, dim=0)
        grad = self.clip_guess_gradient((weights.view(M, n, *([1] * (x0.ndim - 1))) * grads).sum(0))
        return (grad, (weights * rewards).sum(0)) if return_rewards else grad
