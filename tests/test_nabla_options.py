"""Options of Nabla-GFlowNet measured on the digits benchmark: the trajectory-balance correction (``trajectory_balance_scale``)
and the Monte-Carlo forward target (``flow_target_rollouts``), each against an independent computation, with the
terms vanishing where the theory says and the direction they move the policy."""

import pytest
import torch

from trl_gfn import NablaGFlowNetConfig
from trl_gfn.diffusion import log_prob, log_ratio, step_mean
from trl_gfn.trainers.nabla_gfn import TB_ADVANTAGE

from test_nabla_loss import K, batch_at, make_trainer, randomise

BETA = 20.0


def tb_trainer(tmp_path, pipeline, **overrides):
    kwargs = dict(reward_scale=BETA, trajectory_balance_scale=1.0, unet_reg_scale=0.0)
    kwargs.update(overrides)
    return make_trainer(tmp_path, pipeline, **kwargs)


def test_log_ratio_is_the_difference_of_two_gaussian_log_densities():
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 5, 5)
    x_next, mean = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    eps, eps_ref = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    ce, std = torch.tensor([-0.3, -0.1, -0.02]).view(3, 1, 1, 1), torch.tensor([0.7, 0.2, 0.02]).view(3, 1, 1, 1)
    mean_ref = mean - ce * (eps - eps_ref)
    expected = log_prob(x_next.double(), mean.double(), std.double()) - log_prob(x_next.double(), mean_ref.double(), std.double())
    torch.testing.assert_close(log_ratio(x_next, mean, eps, eps_ref, ce, std).double(), expected, rtol=1e-5, atol=1e-3)
    # equal noise predictions: exactly zero
    assert log_ratio(x_next, mean, eps, eps, ce, std).abs().max().item() == 0.0


def test_at_the_reference_the_advantage_is_minus_beta_times_the_reward_deviation(tmp_path, tiny_pipeline):
    """LoRA at its zero initialisation: P_old = P_ref, so δ_τ = −β r(x_0) and A_τ = −β (r − mean r)."""
    trainer = tb_trainer(tmp_path, tiny_pipeline)
    assert not trainer.rewards_from_training  # every reward is needed before training
    samples = trainer.sample_epoch(0)
    advantage = trainer.prepare_training_samples(samples).extras[TB_ADVANTAGE]
    r = samples.rewards.float()
    torch.testing.assert_close(advantage, -BETA * (r - r.mean()), rtol=0, atol=1e-4)
    assert advantage.abs().max() > 1e-3  # the rewards differ, so the check is not trivially 0 = 0


def test_advantage_is_the_path_log_ratio_minus_beta_r_centred(tmp_path, tiny_pipeline):
    """With the policy moved: δ_τ = Σ_k [log P_θ(x_{k-1}|x_k) − log P_ref(x_{k-1}|x_k)] − β r, by float64 log-densities."""
    trainer = tb_trainer(tmp_path, tiny_pipeline)
    randomise(trainer, flow=False, lora_std=0.05)
    samples = trainer.sample_epoch(0)
    advantage = trainer.prepare_training_samples(samples).extras[TB_ADVANTAGE]
    sched, pipe = trainer.schedule, trainer.pipeline
    delta = torch.zeros(len(samples), dtype=torch.float64)
    for i in range(K):
        x, x_next = samples.latents[:, i].double(), samples.latents[:, i + 1].double()
        t = sched.timesteps[i].repeat(len(samples))
        a = sched.alphas_cumprod[i]
        with torch.no_grad():
            eps = pipe.guided_epsilon(pipe.unet, x.float(), t, samples.prompt_embeds, samples.negative_prompt_embeds, 3.0, a.float(),
                                      sched.prediction_type).double()
            with pipe.reference_mode():
                eps_ref = pipe.guided_epsilon(pipe.unet, x.float(), t, samples.prompt_embeds, samples.negative_prompt_embeds, 3.0, a.float(),
                                              sched.prediction_type).double()
        cx, ce, std = (getattr(sched, n)[i].double() for n in ("coef_x", "coef_eps", "std"))
        delta += log_prob(x_next, cx * x + ce * eps, std) - log_prob(x_next, cx * x + ce * eps_ref, std)
    delta -= BETA * samples.rewards.double()
    expected = delta - delta.mean()
    torch.testing.assert_close(advantage.double(), expected, rtol=1e-3, atol=2e-2)
    # the policy really differs from the reference along the path: the log-ratio part is not negligible
    r = samples.rewards.double()
    assert (advantage.double() + BETA * (r - r.mean())).abs().max() > 0.1


def test_the_correction_vanishes_when_every_trajectory_has_the_same_log_ratio(tmp_path, tiny_pipeline):
    trainer = tb_trainer(tmp_path, tiny_pipeline)
    randomise(trainer)
    samples = trainer.prepare_training_samples(trainer.sample_epoch(0))
    batch = batch_at(samples, 2)
    batch.extras[TB_ADVANTAGE] = torch.zeros(len(samples))
    loss, terms = trainer.compute_loss(batch)
    assert terms["loss_trajectory_balance"].item() == 0.0
    off = tb_trainer(tmp_path, tiny_pipeline, trajectory_balance_scale=0.0)
    off.modules.flow_head.load_state_dict(trainer.modules.flow_head.state_dict())
    loss_off, _ = off.compute_loss(batch)
    torch.testing.assert_close(loss, loss_off, rtol=1e-6, atol=0)


@pytest.mark.parametrize("weighting", ["variance", "none"])
@pytest.mark.parametrize("step", [1, K - 1])
def test_correction_gradient_is_mu_times_advantage_times_the_log_density_gradient(tmp_path, tiny_pipeline, step, weighting):
    """∇_θ of the term = μ·mean_b A_b·w_k/D·∇_θ log N(x'; μ_θ(x), σ²) (w_k = σ² with variance weighting), by autograd."""
    mu = 0.5
    trainer = tb_trainer(tmp_path, tiny_pipeline, trajectory_balance_scale=mu, transition_loss_weighting=weighting)
    randomise(trainer, flow=False)
    samples = trainer.prepare_training_samples(trainer.sample_epoch(0))
    batch = batch_at(samples, step)
    batch.extras[TB_ADVANTAGE] = torch.tensor([1.5, -0.5])
    params = trainer.pipeline.lora_parameters()
    _, terms = trainer.compute_loss(batch)
    x, x_next, idx, last, inter, t, a, cx, ce, std = trainer._transition(batch)
    eps = trainer._guided(trainer.pipeline.unet, x, t, batch, None, a)
    dim = x[0].numel()
    w = std**2 if weighting == "variance" else torch.ones_like(std)
    expected_term = mu * (batch.extras[TB_ADVANTAGE] * w.flatten() / dim * log_prob(x_next, step_mean(x, eps, cx, ce), std)).mean()
    expected = torch.autograd.grad(expected_term, params)
    got_term = trainer._trajectory_balance_loss(batch, x, x_next, trainer._guided(trainer.pipeline.unet, x, t, batch, None, a), cx, ce, std, w)
    got = torch.autograd.grad(got_term, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-9)
    assert sum(e.abs().sum() for e in expected) > 0
    # the logged value: the same term up to the log-density's constant, which has no gradient
    assert torch.isfinite(terms["loss_trajectory_balance"])


def test_the_correction_raises_the_likelihood_of_under_sampled_trajectories(tmp_path, tiny_pipeline):
    """Descending μ·Σ A_τ log P_θ alone moves likelihood from the trajectory with A > 0 (over-sampled relative to the
    target) to the one with A < 0."""
    trainer = tb_trainer(tmp_path, tiny_pipeline)
    randomise(trainer, flow=False)
    samples = trainer.prepare_training_samples(trainer.sample_epoch(0))
    batch = batch_at(samples, 1)
    batch.extras[TB_ADVANTAGE] = torch.tensor([1.0, -1.0])
    x, x_next, idx, last, inter, t, a, cx, ce, std = trainer._transition(batch)
    params = trainer.pipeline.lora_parameters()
    opt = torch.optim.SGD(params, lr=0.05)

    def log_likelihoods():
        with torch.no_grad():
            eps = trainer._guided(trainer.pipeline.unet, x, t, batch, None, a)
            return log_prob(x_next, step_mean(x, eps, cx, ce), std)

    before = log_likelihoods()
    for _ in range(5):
        opt.zero_grad()
        eps = trainer._guided(trainer.pipeline.unet, x, t, batch, None, a)
        trainer._trajectory_balance_loss(batch, x, x_next, eps, cx, ce, std, std**2).backward()
        opt.step()
    after = log_likelihoods()
    assert after[1] - before[1] > 0 > after[0] - before[0]


def test_trajectory_balance_config_errors():
    with pytest.raises(ValueError, match="trajectory_balance_scale"):
        NablaGFlowNetConfig(trajectory_balance_scale=-1.0)
    with pytest.raises(ValueError, match="trajectory_balance_scale"):
        NablaGFlowNetConfig(trajectory_balance_scale=1.0, reward_scale=0.0)


def test_training_with_the_correction_runs_and_logs_it(tmp_path, tiny_pipeline):
    trainer = tb_trainer(tmp_path, tiny_pipeline, num_epochs=1, unet_reg_scale=1.0)
    trainer.train()
    assert trainer.state.global_step >= 1


# ----------------------------------------------------------------------- Monte-Carlo forward target (flow_target_rollouts)
def test_rollout_target_is_the_weighted_first_step_noise_of_reference_rollouts(tmp_path, tiny_pipeline):
    """Σ_j softmax(β r(x_0^j)) z_j / σ_k, recomputed here with the same random draws: the rollouts are the reference's
    (the same target with the LoRA moved), and their weights come from the rewards of their own x_0."""
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=BETA, use_flow_head=False, flow_target_rollouts=3)
    samples = trainer.sample_epoch(0)
    x, step = samples.latents[:, 1], torch.full((2,), 1)
    torch.manual_seed(11)
    got = trainer.rollout_flow_target(x, step, samples.prompt_embeds, samples.negative_prompt_embeds, list(samples.prompts), [{}] * 2)
    randomise(trainer, flow=False, lora_std=0.05)
    torch.manual_seed(11)
    moved = trainer.rollout_flow_target(x, step, samples.prompt_embeds, samples.negative_prompt_embeds, list(samples.prompts), [{}] * 2)
    torch.testing.assert_close(got, moved)  # the policy's LoRA plays no part
    # independent recomputation: the same draws, plain loop over the reference chain
    sched, pipe = trainer.schedule, trainer.pipeline
    torch.manual_seed(11)
    rows = torch.arange(2).repeat_interleave(3)
    state, first_noise = x[rows].clone(), None
    with torch.no_grad(), pipe.reference_mode():
        for i in range(1, K):
            eps = pipe.guided_epsilon(pipe.unet, state, sched.timesteps[i].repeat(6), samples.prompt_embeds[rows],
                                      samples.negative_prompt_embeds[rows], 3.0, sched.level(torch.full((6,), i), like=state), sched.prediction_type)
            z = torch.randn_like(state)
            first_noise = z if first_noise is None else first_noise
            state = sched.coef_x[i].float() * state + sched.coef_eps[i].float() * eps + sched.std[i].float() * z
        rewards = trainer.reward_fn(pipe.decode(state), list(samples.prompts) * 3, [{}] * 6)[0].view(2, 3)
    w = torch.softmax(BETA * rewards.double(), dim=1)
    expected = (w.view(2, 3, 1, 1, 1) * first_noise.double().view(2, 3, *x.shape[1:])).sum(1) / sched.std[1]
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_rollout_target_without_reward_is_zero_mean_and_shrinks_with_more_rollouts(tmp_path, tiny_pipeline):
    """β = 0: uniform weights, so the target is the mean of M standard normal draws over σ: norm ≈ sqrt(D / M) / σ."""
    samples = make_trainer(tmp_path, tiny_pipeline).sample_epoch(0)
    x, step = samples.latents[:, 2], torch.full((2,), 2)
    dim = x[0].numel()
    norms = {}
    for M in (4, 64):
        trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=1e-9, use_flow_head=False, flow_target_rollouts=M)
        torch.manual_seed(0)
        target = trainer.rollout_flow_target(x, step, samples.prompt_embeds, samples.negative_prompt_embeds, list(samples.prompts), [{}] * 2)
        norms[M] = float(target.flatten(1).norm(dim=1).mean() * trainer.schedule.std[2])
        assert norms[M] == pytest.approx((dim / M) ** 0.5, rel=0.35)
    assert norms[64] < norms[4] / 2


def test_rollout_target_is_the_forward_target_on_interior_transitions_only(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=BETA, use_flow_head=False, flow_target_rollouts=2)
    samples = trainer.sample_epoch(0)
    batch = batch_at(samples, 2)
    torch.manual_seed(3)
    _, terms = trainer.compute_loss(batch)
    torch.manual_seed(3)
    target = trainer.rollout_flow_target(batch.latents, batch.step_index, batch.prompt_embeds, batch.negative_prompt_embeds,
                                         list(batch.prompts), [{}] * 2)
    torch.testing.assert_close(terms["norm_forward_target"], target.flatten(1).norm(dim=1).mean(), rtol=1e-5, atol=0)
    # the last transition keeps the guess's β γ_K ∇r(x_0) (γ_K = the final ᾱ), as without rollouts
    last = batch_at(samples, K - 1)
    _, terms_last = trainer.compute_loss(last)
    plain = make_trainer(tmp_path, tiny_pipeline, reward_scale=BETA, use_flow_head=False)
    _, plain_last = plain.compute_loss(last)
    exact, _ = trainer.reward_gradient(last.next_latents, list(last.prompts), [{}] * 2)
    torch.testing.assert_close(terms_last["norm_forward_target"], plain_last["norm_forward_target"], rtol=1e-6, atol=0)
    torch.testing.assert_close(terms_last["norm_forward_target"], (BETA * exact).flatten(1).norm(dim=1).mean(), rtol=2e-3, atol=0)
    with pytest.raises(ValueError, match="flow_target_rollouts"):
        NablaGFlowNetConfig(flow_target_rollouts=2)  # the flow head is on by default
    with pytest.raises(ValueError, match="flow_target_rollouts"):
        NablaGFlowNetConfig(flow_target_rollouts=-1, use_flow_head=False)
