"""Nabla-GFlowNet: residual ∇-DB fine-tuning of a diffusion model's LoRA (DESIGN.md §2).

Cost per trained transition (units: one guided UNet forward without grad; a backward ≈ 2 units), as
implemented below:
- interior step, no reverse term: next-state reward gradient (UNet fwd + input backward at x_{k-1},
  VAE decode fwd+bwd, reward fwd+bwd) + reference forward at x_k (no grad) + policy forward and
  parameter backward at x_k;
- interior step, reverse term: + one extra backward through the policy UNet at x_k that yields both
  ∇_{x_k} log P_F^θ and the reward gradient at x_k, + a reference forward/backward at x_k;
- last step (x_1 → x_0): x̂_0(x_0) = x_0, so no UNet call at x_0; the reverse term is not applied.
``benchmarks/transition_cost.py`` measures these units.
"""

from __future__ import annotations

from typing import Any

import torch

from ..configs.nabla_gfn import NablaGFlowNetConfig
from ..diffusion import predict_x0, score_current, score_next, step_mean
from ..models import FlowHead
from ..pipelines import Trajectories, TransitionBatch
from .base import TransitionTrainer, sample_seed

CITATION = """@inproceedings{liu2025nablagfn,
  title     = {Efficient Diversity-Preserving Diffusion Alignment via Gradient-Informed GFlowNets},
  author    = {Liu, Zhen and Xiao, Tim Z. and Liu, Weiyang and Bengio, Yoshua and Zhang, Dinghuai},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  eprint    = {2412.07775}
}"""

LOSS_KEYS = ("loss", "loss_forward", "loss_reverse", "loss_terminal", "loss_reg", "norm_policy_residual", "norm_reward_guess",
             "norm_flow", "norm_forward_target")


def _rows(items: list, mask: torch.Tensor) -> list:
    return [item for item, keep in zip(items, mask.tolist()) if keep]


class NablaGFlowNetTrainer(TransitionTrainer):
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
    card_fields = [*TransitionTrainer.card_fields, "reward_scale", "unet_reg_scale", "reverse_loss_scale", "pretrained_strength",
                   "use_flow_head", "train_timestep_fraction", "reward_gradient_scaling"]

    def __init__(self, config: NablaGFlowNetConfig, reward_function, pipeline, prompt_function: Any = None, image_samples_hook=None):
        self._previous_samples: Trajectories | None = None
        super().__init__(config, reward_function, pipeline, prompt_function=prompt_function, image_samples_hook=image_samples_hook)

    # ------------------------------------------------------------------ modules and optimizer
    def build_modules(self) -> dict[str, torch.nn.Module]:
        c = self.config
        if not c.use_flow_head:
            return {}
        unet = self.pipeline.unet
        head = FlowHead(
            in_channels=unet.config.in_channels,
            block_out_channels=tuple(int(w) for w in c.flow_block_out_channels),
            layers_per_block=c.flow_layers_per_block,
            cross_attention_dim=self.pipeline.text_encoder.config.hidden_size,
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

    def model_card_extra_usage(self) -> str:
        if not self.config.use_flow_head:
            return ""
        return ("\nThe learned residual flow-gradient head is in `flow_head/` "
                "(`trl_gfn.FlowHead.from_pretrained(repo_id, subfolder=\"flow_head\")`); it is not needed to sample.\n")

    # ------------------------------------------------------------------ which transitions
    def prepare_training_samples(self, samples: Trajectories) -> Trajectories:
        if not self.config.train_on_previous_samples:
            return samples
        previous, self._previous_samples = self._previous_samples, samples
        return previous if previous is not None else samples

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if self.config.train_on_previous_samples:
            import warnings

            warnings.warn("train_on_previous_samples: checkpoints do not hold the previous epoch's samples; the first resumed "
                          "epoch trains on the samples it has just drawn", UserWarning, stacklevel=2)

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
    def _guided(self, unet, latents, timesteps, batch: TransitionBatch, rows: torch.Tensor | None, alpha_bar) -> torch.Tensor:
        pos, neg = batch.prompt_embeds, batch.negative_prompt_embeds
        if rows is not None:
            pos, neg = pos[rows], neg[rows]
        return self.pipeline.guided_epsilon(unet, latents, timesteps, pos, neg, self.config.sample_guidance_scale, alpha_bar,
                                            self.schedule.prediction_type)

    def _gamma(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        return alpha_bar if self.config.reward_gradient_scaling == "squared" else alpha_bar.sqrt()

    def next_state_reward_gradient(self, batch: TransitionBatch) -> torch.Tensor:
        """∇_{x_{k-1}} r(decode(x̂_0^θ(x_{k-1}))) per sample (input gradient only; no parameter gradient).

        For the last transition x̂_0(x_0) = x_0 (no UNet call). With ``jacobian_free_reward_gradient``
        the recorded ε̂ at x_{k-1} is held constant, so ∇_x x̂_0 = 1/sqrt(ᾱ) and no UNet call is made.
        """
        sched = self.schedule
        x_next = batch.next_latents.float()
        last = batch.step_index == sched.num_steps - 1
        grad = torch.zeros_like(x_next)
        if last.any():
            grad[last], _ = self.reward_gradient(x_next[last], _rows(batch.prompts, last), _rows(batch.prompt_metadata, last))
        inter = ~last
        if inter.any():
            xn = x_next[inter]
            idx = batch.step_index[inter] + 1
            a = sched.gather("alphas_cumprod", idx, like=xn)
            prompts, meta = _rows(batch.prompts, inter), _rows(batch.prompt_metadata, inter)
            if self.config.jacobian_free_reward_gradient:
                g0, _ = self.reward_gradient(predict_x0(xn, batch.next_epsilons[inter].float(), a), prompts, meta)
                grad[inter] = g0 / a.sqrt()
            else:
                xn = xn.detach().requires_grad_(True)
                with torch.enable_grad():
                    eps = self._guided(self.pipeline.unet, xn, sched.timesteps[idx], batch, inter, a)
                    x0 = predict_x0(xn, eps, a)
                    g0, _ = self.reward_gradient(x0, prompts, meta)  # ∇_{x̂0} r on its own graph (VAE + reward freed)
                    (grad[inter],) = torch.autograd.grad((x0 * g0).sum(), xn)
        return grad

    def compute_loss(self, batch: TransitionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Residual ∇-DB loss of a batch of transitions x_k → x_{k-1} (DESIGN.md §2).

        Returns ``(loss, terms)`` with ``terms`` the detached scalars: ``loss_forward``, ``loss_reverse``,
        ``loss_terminal``, ``loss_reg`` and per-sample L2 norms of the policy score residual
        s_θ − s_ref, of the reward guess β·γ·∇r, of the flow head output and of the forward target.
        """
        c, sched = self.config, self.schedule
        x, x_next = batch.latents.float(), batch.next_latents.float()
        idx = batch.step_index
        last = idx == sched.num_steps - 1
        inter = ~last
        beta, strength = c.reward_scale, c.pretrained_strength
        t, t_next = sched.timesteps[idx], sched.next_timesteps[idx]
        a, a_next = sched.gather("alphas_cumprod", idx, like=x), sched.gather("alphas_cumprod", idx + 1, like=x)
        cx, ce, std = (sched.gather(name, idx, like=x) for name in ("coef_x", "coef_eps", "std"))
        use_flow = c.use_flow_head
        use_reverse = use_flow and c.reverse_loss_scale > 0 and bool(inter.any())
        zero = x.new_zeros(())

        # 1. next-state reward gradient first: input gradient only, its graph freed before the policy graph exists
        guess_next = beta * self._gamma(a_next) * self.next_state_reward_gradient(batch) if beta > 0 else torch.zeros_like(x)

        # 2. reference policy at x_k (adapter off): mean, and with the reverse term its score w.r.t. x_k
        if use_reverse:
            xr = x.detach().requires_grad_(True)
            with self.pipeline.reference_mode(), torch.enable_grad():
                mean_ref = step_mean(xr, self._guided(self.pipeline.unet, xr, t, batch, None, a), cx, ce)
                ref_score_cur = strength * score_current(x_next, mean_ref, std, xr, retain_graph=False)
            mean_ref = mean_ref.detach()
        else:
            with self.pipeline.reference_mode(), torch.no_grad():
                mean_ref = step_mean(x, self._guided(self.pipeline.unet, x, t, batch, None, a), cx, ce)
        ref_score_next = strength * score_next(x_next, mean_ref, std)

        # 3. policy at x_k through the prepared model (parameter gradients synchronised across processes)
        xp = x.detach().requires_grad_(use_reverse)
        eps = self._guided(self.wrapped("unet"), xp, t, batch, None, a)
        mean = step_mean(xp, eps, cx, ce)
        s_theta = score_next(x_next, mean, std)

        # 4. flow head at x_{k-1} (and at x_k for the reverse term), one call
        g_next = g_cur = None
        if use_flow:
            lat, ts, emb = [x_next], [t_next], [batch.prompt_embeds]
            if use_reverse:
                lat.append(x[inter]), ts.append(t[inter]), emb.append(batch.prompt_embeds[inter])
            g_all = self.wrapped("flow_head")(torch.cat(lat), torch.cat(ts), torch.cat(emb))
            g_next, g_cur = g_all[: x.shape[0]], g_all[x.shape[0]:]

        # 5. forward ∇-DB: s_θ = s_ref + g(x_{k-1}) + βγ∇r(x̂_0(x_{k-1})); no g on the last transition
        target = ref_score_next + guess_next
        if use_flow:
            target = target + g_next * inter.view(-1, 1, 1, 1).to(x.dtype)
        weight = std**2 if c.transition_loss_weighting == "variance" else torch.ones_like(std)
        loss_forward = (weight * (s_theta - target) ** 2).mean()
        loss_terminal = (g_next[last] ** 2).mean() if use_flow and bool(last.any()) else zero

        # 6. reverse ∇-DB (trains g only): ∇_{x_k}[log P_θ + βγ_k r(x̂_0^θ(x_k))] + g(x_k) − s∇_{x_k} log P_ref = 0
        loss_reverse = zero
        if use_reverse:
            x0 = predict_x0(xp, eps, a)
            vjp = torch.zeros_like(x)
            if beta > 0:
                g0, _ = self.reward_gradient(x0[inter], _rows(batch.prompts, inter), _rows(batch.prompt_metadata, inter))
                vjp[inter] = beta * self._gamma(a[inter]) * g0
            surrogate = -0.5 * ((x_next - mean) ** 2 / std**2).sum() + (vjp * x0).sum()
            (policy_side,) = torch.autograd.grad(surrogate, xp, retain_graph=True)
            loss_reverse = (weight[inter] * (policy_side.detach()[inter] - ref_score_cur[inter] + g_cur) ** 2).mean()

        # 7. output regulariser: trust region around the sampling policy's guided prediction
        loss_reg = ((eps - batch.epsilons.float()) ** 2).mean() if c.unet_reg_scale > 0 else zero

        loss = loss_forward + c.reverse_loss_scale * loss_reverse + loss_terminal + c.unet_reg_scale * loss_reg

        def norm(v: torch.Tensor | None) -> torch.Tensor:
            return zero if v is None else v.detach().flatten(1).norm(dim=1).mean()

        terms = dict(zip(LOSS_KEYS, (loss.detach(), loss_forward.detach(), loss_reverse.detach(), loss_terminal.detach(),
                                     loss_reg.detach(), norm(s_theta - ref_score_next), norm(guess_next), norm(g_next), norm(target))))
        return loss, terms
