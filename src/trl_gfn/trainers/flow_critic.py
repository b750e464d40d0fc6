"""The Monte-Carlo log-flow critic of Nabla-GFlowNet (``flow_estimator="monte_carlo"``, docs/nabla_gfn.md): a scalar model
of log F̃ fitted to reference-sampler rollouts by a proper scoring loss, with an optional warm-up on reference trajectories.

F̃_k(x) = E_ref[exp(β r(x_0)) | x_k = x] belongs to the reference sampler, so unlike the reverse-∇-DB flow head its target
does not move with the policy. :class:`MonteCarloFlowCritic` holds the critic's parts; the trainer assembles the loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..diffusion import predict_x0, step_mean
from .base import sample_seed


def rows_where(items: list, mask: torch.Tensor) -> list:
    """The entries of ``items`` where ``mask`` is True."""
    return [item for item, keep in zip(items, mask.tolist()) if keep]


def take_rows(items: list, index: torch.Tensor) -> list:
    """``items`` at the positions ``index``."""
    return [items[i] for i in index.tolist()]


class MonteCarloFlowCritic:
    """Mixin of :class:`~trl_gfn.NablaGFlowNetTrainer`: the flow head as a log-flow critic β·u_ψ(x, τ) (u_ψ the spatial
    mean of its output), its baseline, loss, rollouts and warm-up. Active with ``flow_estimator="monte_carlo"``."""

    def __init__(self, *args, **kwargs):
        self._critic_warmed_up = False
        self._value_offset: float | None = None  # running maximum of r over the critic's rollouts
        super().__init__(*args, **kwargs)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"value_offset": self._value_offset} if self.config.flow_estimator == "monte_carlo" else {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        if "value_offset" in state:
            self._value_offset = state["value_offset"]

    def log_flow(self, head, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The critic's learned part β·u_ψ(x, τ) per sample, u_ψ the spatial mean of the flow head's output (in reward
        units). With ``value_baseline="guess"`` log F̃(x) − β·m is modelled as β·γ_k·r(decode(x̂_0(x))) + β·u_ψ, else as
        β·u_ψ alone (F̃ = E_ref[exp(β r(x_0)) | x], m the running maximum of r)."""
        return self.config.reward_scale * head(latents, timesteps, prompt_embeds).flatten(1).mean(1)

    @torch.no_grad()
    def value_baseline(self, latents: torch.Tensor, position: torch.Tensor, epsilon: torch.Tensor, prompts: list, prompt_metadata: list,
                       chunk: int = 256) -> torch.Tensor:
        """β·γ_k·r(decode(x̂_0)) at states ``latents`` of sampling positions ``position`` (< K), x̂_0 from the guided noise
        prediction ``epsilon`` there (the reference's): the critic's baseline with ``value_baseline="guess"`` (zeros with
        "none"). No gradient: the critic's fit needs its value, the forward target its gradient (:meth:`reward_guess`)."""
        c, sched = self.config, self.schedule
        if c.value_baseline == "none":
            return torch.zeros(latents.shape[0], device=latents.device)
        a = sched.level(position, like=latents)
        x0 = predict_x0(latents.float(), epsilon.float(), a)
        rewards = torch.cat([self.score_no_grad(self.pipeline.decode(x0[i:i + chunk]), prompts[i:i + chunk], prompt_metadata[i:i + chunk])[0]
                             for i in range(0, len(x0), chunk)])
        return c.reward_scale * self._gamma(a, c.reward_scale).flatten() * rewards.float()

    def critic_loss(self, log_flow: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """Proper scoring loss of the log-flow critic, mean over states of (e^{y − V} + V)/β with y = β(r(x_0) − m): for
        every state its minimiser is e^V = E[e^y | x], i.e. V = log F̃ − β m exactly, in log space (a rollout that ends
        far below the others moves V by its weight e^{y − V}, not by its log-reward). Above y − V = 10 the exponential
        is continued linearly, which bounds one rollout's weight at e^10 without changing the minimiser elsewhere."""
        beta = self.config.reward_scale
        z = beta * (rewards - self._value_offset) - log_flow
        cap = 10.0
        weight = torch.where(z <= cap, torch.exp(z.clamp(max=cap)), math.exp(cap) * (1 + z - cap))
        return (weight + log_flow).mean() / beta

    @torch.no_grad()
    def reference_chain(self, latents: torch.Tensor, position: torch.Tensor, prompt_embeds, negative_prompt_embeds, prompts: list,
                        prompt_metadata: list, *, record: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """Run the reference sampler (adapter off, the sampling CFG) from each state ``latents[i]`` at sampling position
        ``position[i]`` (< K) to x_0 and score x_0. Returns ``(rewards, first_noise, visited)``: each row's r(x_0), the
        standard normal draw z of each row's first step, and with ``record`` the ``(states, positions, rows, epsilons)``
        of every state a rollout passed through before x_0 (the start state included); else None."""
        c, sched = self.config, self.schedule
        x = latents.detach().float().clone()
        first_noise = torch.zeros_like(x)
        arange = torch.arange(x.shape[0], device=x.device)
        states, positions, rows, epsilons = [], [], [], []
        with self.pipeline.reference_mode():
            for i in range(int(position.min()), sched.num_steps):
                active = position <= i
                idx = torch.full((int(active.sum()),), i, dtype=torch.long, device=x.device)
                xa = x[active]
                eps = self.pipeline.guided_epsilon(self.pipeline.denoiser, xa, sched.timesteps[idx], prompt_embeds[active], negative_prompt_embeds[active],
                                                   c.sample_guidance_scale, sched.level(idx, like=xa), sched.prediction_type).float()
                if record:
                    states.append(xa.clone()), positions.append(idx), rows.append(arange[active]), epsilons.append(eps)
                z = torch.randn_like(xa)
                starts = position == i
                first_noise[starts] = z[starts[active]]
                mean = step_mean(xa, eps, sched.gather("coef_x", idx, like=xa), sched.gather("coef_eps", idx, like=xa))
                x[active] = mean + sched.gather("std", idx, like=xa) * z
            rewards, _ = self.score_no_grad(self.pipeline.decode(x), prompts, prompt_metadata)
        visited = tuple(torch.cat(v) for v in (states, positions, rows, epsilons)) if record else None
        return rewards.float(), first_noise, visited

    def reference_rollouts(self, latents: torch.Tensor, position: torch.Tensor, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
                           prompts: list, prompt_metadata: list) -> tuple[torch.Tensor, ...]:
        """:meth:`reference_chain` from each state ``latents[i]`` at ``position[i]``, for the critic. Returns ``(states,
        positions, rows, rewards, baselines)``: every state a rollout passed through before x_0 (the start state
        included), its position, the row it came from, each row's r(x_0), and each state's :meth:`value_baseline`.
        Given such a state the rest of its rollout is a reference rollout, so each is an unbiased example of F̃."""
        rewards, _, (states, positions, rows, epsilons) = self.reference_chain(latents, position, prompt_embeds, negative_prompt_embeds, prompts,
                                                                                prompt_metadata, record=True)
        baselines = self.value_baseline(states, positions, epsilons, take_rows(prompts, rows), take_rows(prompt_metadata, rows))
        return states, positions, rows, rewards, baselines


    def fit_critic(self, latents: torch.Tensor, position: torch.Tensor, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
                   prompts: list, prompt_metadata: list) -> torch.Tensor:
        """The critic's loss on ``value_rollouts`` reference rollouts from each state ``latents[i]`` (sampling position
        ``position[i]`` < K), over every state they pass through; updates the running maximum m. Its gradient reaches
        the flow head only (through the accelerate-prepared module)."""
        c = self.config
        reps = c.value_rollouts
        sel = torch.arange(latents.shape[0], device=latents.device).repeat(reps)
        states, pos, rows, rewards, baselines = self.reference_rollouts(latents[sel], position[sel], prompt_embeds[sel], negative_prompt_embeds[sel],
                                                                        list(prompts) * reps, list(prompt_metadata) * reps)
        batch_max = float(rewards.max())
        self._value_offset = batch_max if self._value_offset is None else max(self._value_offset, batch_max)
        head = self.wrapped("flow_head", checkpoint=True if c.memory_efficient_order else None)
        return self.critic_loss(baselines + self.log_flow(head, states, self.schedule.timesteps[pos], prompt_embeds[sel][rows]), rewards[rows])

    def step(self, epoch: int, global_step: int) -> int:
        if global_step == 0 and self.config.value_warmup_trajectories > 0 and not self._critic_warmed_up:
            self.warm_up_critic()
        return super().step(epoch, global_step)

    def warm_up_critic(self) -> dict[str, float]:
        """Fit the log-flow critic to ``value_warmup_trajectories`` reference trajectories before the policy moves
        (``flow_estimator="monte_carlo"``): every state x_k of a reference trajectory, labelled with that trajectory's
        r(x_0), is an unbiased example of F̃(x_k) (the rest of the trajectory is a reference rollout from x_k). Runs once,
        at the first step of a run that does not resume; returns the critic loss at the first and the last warm-up step."""
        c, sched = self.config, self.schedule
        K, device = sched.num_steps, self.accelerator.device
        states, positions, embeds, rewards, baselines = [], [], [], [], []
        for start in range(0, c.value_warmup_trajectories, c.sample_batch_size):
            ids = [start + i + self.accelerator.process_index * c.value_warmup_trajectories
                   for i in range(min(c.sample_batch_size, c.value_warmup_trajectories - start))]
            prompts, metadata = self.prompt_source(ids, 0)
            traj = self.sample_reference(prompts, metadata, [sample_seed(c.seed, -1, i, 29) for i in ids])
            r, _ = self.score_no_grad(traj.images, prompts, metadata)
            n = len(ids)
            states.append(traj.latents[:, :K].reshape(n * K, *traj.latents.shape[2:]).float())
            positions.append(torch.arange(K, device=device).repeat(n))
            with self.pipeline.reference_mode():
                baselines.append(self.value_baseline(states[-1], positions[-1], traj.epsilons.reshape(n * K, *traj.epsilons.shape[2:]),
                                                     [p for p in prompts for _ in range(K)], [m for m in metadata for _ in range(K)]))
            embeds.append(traj.prompt_embeds.repeat_interleave(K, 0))
            rewards.append(r.float().repeat_interleave(K, 0))
        states, positions, embeds, rewards, baselines = (torch.cat(v) for v in (states, positions, embeds, rewards, baselines))
        best = float(self.accelerator.gather(rewards).max())
        self._value_offset = best if self._value_offset is None else max(self._value_offset, best)
        head = self.wrapped("flow_head")
        params = [p for p in self.flow_head.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c.flow_learning_rate, weight_decay=c.flow_weight_decay)
        gen = torch.Generator().manual_seed(sample_seed(c.seed, -1, 31))
        losses = []
        for _ in range(c.value_warmup_steps):
            pick = torch.randint(len(states), (c.value_warmup_batch_size,), generator=gen).to(device)
            loss = self.critic_loss(baselines[pick] + self.log_flow(head, states[pick], sched.timesteps[positions[pick]], embeds[pick]),
                                    rewards[pick])
            optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            optimizer.step()
            losses.append(float(loss.detach()))
        for p in params:
            p.grad = None
        self._critic_warmed_up = True
        result = {"critic_warmup_loss_first": losses[0], "critic_warmup_loss_last": float(sum(losses[-10:]) / len(losses[-10:]))}
        self.log(result, step=0)
        return result

