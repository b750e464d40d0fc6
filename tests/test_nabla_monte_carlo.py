"""flow_estimator="monte_carlo": the log-flow critic fitted to reference rollouts, and the forward ∇-DB target it gives."""

import pytest
import torch

from trl_gfn import NablaGFlowNetConfig, NablaGFlowNetTrainer, TransitionBatch
from trl_gfn.diffusion import score_residual, step_mean
from trl_gfn.testing import BrightnessReward

PROMPTS = ["a red cat", "a blue dog"]
K = 6


def make_trainer(tmp_path, pipeline, **overrides):
    kwargs = dict(sample_num_steps=K, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2, logdir=str(tmp_path),
                  flow_block_out_channels=[8, 16], flow_attention_head_dim=4, save_freq=0, log_image_freq=0, reward_scale=5.0,
                  unet_reg_scale=1.0, sample_guidance_scale=3.0, train_timestep_fraction=0.34, flow_estimator="monte_carlo")
    kwargs.update(overrides)
    return NablaGFlowNetTrainer(NablaGFlowNetConfig(**kwargs), BrightnessReward(), pipeline, prompt_function=PROMPTS)


def randomise(trainer, seed=3):
    torch.manual_seed(seed)
    conv = trainer.flow_head.unet.conv_out
    torch.nn.init.normal_(conv.weight, std=0.05)
    torch.nn.init.normal_(conv.bias, std=0.05)
    for p in trainer.pipeline.lora_parameters():
        torch.nn.init.normal_(p, std=0.02)


def batch_at(samples, step):
    return TransitionBatch.from_trajectories(samples, torch.full((len(samples),), step))


def test_config_rejects_what_the_critic_cannot_do():
    with pytest.raises(ValueError, match="flow_estimator"):
        NablaGFlowNetConfig(flow_estimator="monte_carlo", use_flow_head=False)
    with pytest.raises(ValueError, match="reverse_loss_scale"):
        NablaGFlowNetConfig(flow_estimator="monte_carlo", reverse_loss_scale=1.0)
    with pytest.raises(ValueError, match="flow_estimator"):
        NablaGFlowNetConfig(flow_estimator="critic")
    with pytest.raises(ValueError, match="value_rollouts"):
        NablaGFlowNetConfig(flow_estimator="monte_carlo", value_rollouts=0)
    assert NablaGFlowNetConfig(flow_estimator="monte_carlo").reverse_loss_scale == 0.0
    assert NablaGFlowNetConfig().reverse_loss_scale == 1.0


def test_reference_rollouts_visit_every_later_state_once_per_row(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline)
    samples = trainer.sample_epoch(0)
    emb = trainer.pipeline.encode_prompts(list(samples.prompts))
    neg = trainer.pipeline.encode_prompts([""]).expand(len(samples), -1, -1)
    position = torch.tensor([2, 4])
    start = samples.latents[torch.arange(2), position]
    states, pos, rows, rewards, baselines = trainer.reference_rollouts(start, position, emb, neg, list(samples.prompts),
                                                                       list(samples.prompt_metadata))
    assert sorted(zip(rows.tolist(), pos.tolist())) == [(0, i) for i in range(2, K)] + [(1, i) for i in range(4, K)]
    for r in range(2):  # each row's first state is the start state
        first = (rows == r) & (pos == position[r])
        torch.testing.assert_close(states[first][0], start[r])
    assert rewards.shape == (2,) and rewards.dtype == torch.float32
    # each state's baseline is β γ_k r(decode(x̂_0)) with the reference's guided noise prediction at it
    c, sched = trainer.config, trainer.schedule
    with torch.no_grad(), trainer.pipeline.reference_mode():
        a = sched.alphas_cumprod[pos].float().view(-1, 1, 1, 1)
        eps = trainer.pipeline.guided_epsilon(trainer.pipeline.unet, states, sched.timesteps[pos], emb[rows], neg[rows], c.sample_guidance_scale,
                                              a, sched.prediction_type)
        x0 = (states - (1 - a).sqrt() * eps) / a.sqrt()
        r = trainer.reward_fn(trainer.pipeline.decode(x0), [samples.prompts[i] for i in rows.tolist()], [{}] * len(rows))[0]
    torch.testing.assert_close(baselines, c.reward_scale * a.flatten() * r, rtol=1e-4, atol=1e-6)
    # the rollouts are the reference's: with the LoRA moved, the states they pass through do not change
    torch.manual_seed(0)
    before = trainer.reference_rollouts(start, position, emb, neg, list(samples.prompts), list(samples.prompt_metadata))
    randomise(trainer)
    torch.manual_seed(0)
    after = trainer.reference_rollouts(start, position, emb, neg, list(samples.prompts), list(samples.prompt_metadata))
    torch.testing.assert_close(before[0], after[0])
    torch.testing.assert_close(before[3], after[3])


@pytest.mark.parametrize("baseline", ["guess", "none"])
@pytest.mark.parametrize("step", [2, K - 1])
def test_forward_target_is_the_critic_gradient_or_the_exact_reward_gradient(tmp_path, tiny_pipeline, step, baseline):
    trainer = make_trainer(tmp_path, tiny_pipeline, value_baseline=baseline)
    samples = trainer.sample_epoch(0)
    randomise(trainer)
    batch = batch_at(samples, step)
    sched, c = trainer.schedule, trainer.config
    y = batch.next_latents.detach().clone().requires_grad_(True)
    if step < K - 1:  # ∇_y β·mean(head(y)), + the guess (tested against an independent computation in test_nabla_loss.py)
        u = trainer.flow_head(y, sched.timesteps[step + 1].repeat(2), batch.prompt_embeds).flatten(1).mean(1)
        (target,) = torch.autograd.grad(c.reward_scale * u.sum(), y)
        if baseline == "guess":
            target = target + trainer.reward_guess(batch.next_latents, torch.full((2,), step + 1), batch.prompt_embeds,
                                                   batch.negative_prompt_embeds, list(batch.prompts), [{}] * 2)
    else:  # β ∇_y r(decode(y)) at x_0
        images = trainer.pipeline.decode(y)
        (target,) = torch.autograd.grad(trainer.reward_fn(images, list(batch.prompts), [{}] * 2)[0].sum(), y)
        target = c.reward_scale * float(sched.alphas_cumprod[K]) * target
    assert target.abs().max() > 0
    x = batch.latents
    idx = torch.full((2,), step)
    cx, ce, std = (sched.gather(n, idx, like=x) for n in ("coef_x", "coef_eps", "std"))
    with torch.no_grad():
        eps = trainer.pipeline.guided_epsilon(trainer.pipeline.unet, x, sched.timesteps[idx], batch.prompt_embeds, batch.negative_prompt_embeds,
                                              c.sample_guidance_scale, sched.gather("alphas_cumprod", idx, like=x), sched.prediction_type)
        with trainer.pipeline.reference_mode():
            eps_ref = trainer.pipeline.guided_epsilon(trainer.pipeline.unet, x, sched.timesteps[idx], batch.prompt_embeds,
                                                      batch.negative_prompt_embeds, c.sample_guidance_scale,
                                                      sched.gather("alphas_cumprod", idx, like=x), sched.prediction_type)
    residual = score_residual(eps, eps_ref, ce, std)
    expected_forward = (std**2 * (residual - target) ** 2).mean()
    loss, terms = trainer.compute_loss(batch)
    torch.testing.assert_close(terms["loss_forward"], expected_forward, rtol=1e-4, atol=1e-7)
    if step == K - 1:  # no interior row: the critic is not fitted, no rollout
        assert terms["loss_critic"] == 0
    else:  # the critic's loss is on
        assert terms["loss_critic"] != 0
    assert terms["loss_reverse"] == 0 and terms["loss_terminal"] == 0
    torch.testing.assert_close(loss, terms["loss_forward"] + terms["loss_critic"] + c.unet_reg_scale * terms["loss_reg"])


def test_critic_labels_follow_the_running_maximum(tmp_path, tiny_pipeline, monkeypatch):
    trainer = make_trainer(tmp_path, tiny_pipeline)
    samples = trainer.sample_epoch(0)
    seen = []
    original = trainer.reference_rollouts

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[3])
        return out

    monkeypatch.setattr(trainer, "reference_rollouts", spy)
    trainer.compute_loss(batch_at(samples, 1))
    trainer.compute_loss(batch_at(samples, 2))
    assert trainer._value_offset == pytest.approx(max(float(r.max()) for r in seen), rel=1e-6)


def test_critic_loss_is_minimised_at_the_log_mean_exp_of_the_rollouts(tmp_path, tiny_pipeline):
    """For one state with rollouts r_i, argmin_V mean_i(e^{β(r_i − m) − V} + V) = log mean_i e^{β(r_i − m)}, also when one
    rollout is far above the others (the linear continuation only bounds its weight above z = 10)."""
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=4.0)
    rewards = torch.tensor([-3.0, -1.0, -0.5, -2.5, 0.25], dtype=torch.float64)
    trainer._value_offset = 0.25
    best = torch.logsumexp(4.0 * (rewards - 0.25), 0) - torch.log(torch.tensor(5.0, dtype=torch.float64))
    # the loss is convex in V: its gradient vanishes there, is negative below and positive above
    for shift, sign in ((-3.0, -1), (-0.01, -1), (0.0, 0), (0.01, 1), (3.0, 1)):
        w = (best + shift).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(trainer.critic_loss(w.expand(5), rewards), w)
        assert (abs(float(g)) < 1e-12) if sign == 0 else (float(g) * sign > 0)
    # a rollout far above the others (z > 10): its weight grows linearly, still pulling V up
    w = torch.tensor(-60.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(trainer.critic_loss(w.expand(5), rewards), w)
    assert torch.isfinite(g) and float(g) < 0


def test_critic_learns_which_states_lead_to_higher_rewards(tmp_path, tiny_pipeline):
    """Fitted to fixed rollouts of two rows, the critic ranks every state of the better row's rollout above the other's."""
    trainer = make_trainer(tmp_path, tiny_pipeline, value_baseline="none")
    samples = trainer.sample_epoch(0)
    emb = trainer.pipeline.encode_prompts(list(samples.prompts))
    neg = trainer.pipeline.encode_prompts([""]).expand(2, -1, -1)
    position = torch.tensor([1, 1])
    torch.manual_seed(0)
    states, pos, rows, rewards, baselines = trainer.reference_rollouts(samples.latents[:, 1], position, emb, neg, list(samples.prompts),
                                                                       list(samples.prompt_metadata))
    gap = float((rewards[0] - rewards[1]).abs())
    assert gap > 0
    trainer.config.reward_scale = 4.0 / gap  # the two rollouts' log-rewards differ by 4 nats
    trainer._value_offset = float(rewards.max())
    better = int(rewards.argmax())
    head = trainer.flow_head
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)

    def margin():
        with torch.no_grad():
            v = trainer.log_flow(head, states, trainer.schedule.timesteps[pos], emb[rows])
        return float(v[rows == better].mean() - v[rows != better].mean())

    assert margin() == 0  # zero-initialised output
    for _ in range(150):
        opt.zero_grad()
        trainer.critic_loss(baselines + trainer.log_flow(head, states, trainer.schedule.timesteps[pos], emb[rows]), rewards[rows]).backward()
        opt.step()
    assert margin() > 1.0  # 1.45 measured; 0 before fitting


def test_the_forward_term_trains_the_lora_and_the_critic_term_the_head(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=100.0)
    samples = trainer.sample_epoch(0)
    randomise(trainer)
    _, terms = trainer.compute_loss(batch_at(samples, 1))
    params = {"lora": list(trainer.pipeline.lora_parameters()), "head": list(trainer.flow_head.parameters())}

    def grads(loss):
        flat = []
        for group in params.values():
            gs = torch.autograd.grad(loss, group, allow_unused=True, retain_graph=True)
            flat.append(sum(float(g.abs().sum()) for g in gs if g is not None))
        return flat

    torch.manual_seed(0)
    loss, terms = trainer.compute_loss(batch_at(samples, 1))
    lora, head = grads(loss)
    assert lora > 0 and head > 0
    # without the critic's term (β = 0 switches it off) no gradient reaches the head
    trainer.config.reward_scale = 0.0
    loss, terms = trainer.compute_loss(batch_at(samples, 1))
    lora, head = grads(loss)
    assert lora > 0 and head == 0 and terms["loss_critic"] == 0


def test_checkpoint_state_keeps_the_running_maximum(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline)
    trainer._value_offset = -1.25
    assert trainer.checkpoint_state() == {"value_offset": -1.25}
    other = make_trainer(tmp_path, tiny_pipeline)
    other.load_checkpoint_state({"value_offset": -1.25})
    assert other._value_offset == -1.25
    assert make_trainer(tmp_path, tiny_pipeline, flow_estimator="nabla_db").checkpoint_state() == {}


@pytest.mark.parametrize("baseline", ["guess", "none"])
def test_flow_gradient_of_the_critic(tmp_path, tiny_pipeline, baseline):
    trainer = make_trainer(tmp_path, tiny_pipeline, value_baseline=baseline)
    randomise(trainer)
    samples = trainer.sample_epoch(0)
    x = samples.latents[:, 3]
    prompts = list(samples.prompts)
    g = trainer.flow_gradient(x, 3, prompts)
    y = x.detach().clone().requires_grad_(True)
    emb = trainer.pipeline.encode_prompts(prompts)
    u = trainer.flow_head(y, trainer.schedule.timesteps[3].repeat(2), emb).flatten(1).mean(1)
    (learned,) = torch.autograd.grad(trainer.config.reward_scale * u.sum(), y)
    without = trainer.flow_gradient(x, 3, prompts, include_flow_head=False)
    torch.testing.assert_close(g, without + learned)
    if baseline == "none":
        assert without.abs().max() == 0
    else:
        neg = trainer.pipeline.encode_prompts([""]).expand(2, -1, -1)
        torch.testing.assert_close(without, trainer.reward_guess(x, torch.full((2,), 3), emb, neg, prompts, [{}] * 2))
        assert without.abs().max() > 0


def test_training_with_the_critic_moves_the_policy(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, num_epochs=2)
    before = [p.detach().clone() for p in trainer.pipeline.lora_parameters()]
    head_before = [p.detach().clone() for p in trainer.flow_head.parameters()]
    trainer.train()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.pipeline.lora_parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(head_before, trainer.flow_head.parameters()))


def test_warm_up_fits_the_critic_once_before_the_first_update(tmp_path, tiny_pipeline, monkeypatch):
    trainer = make_trainer(tmp_path, tiny_pipeline, num_epochs=2, value_warmup_trajectories=3, value_warmup_steps=4, value_warmup_batch_size=5,
                           reward_scale=50.0)
    calls = []
    original = trainer.warm_up_critic

    def spy():
        head_before = [p.detach().clone() for p in trainer.flow_head.parameters()]
        lora_before = [p.detach().clone() for p in trainer.pipeline.lora_parameters()]
        out = original()
        calls.append(out)
        assert any(not torch.equal(a, p) for a, p in zip(head_before, trainer.flow_head.parameters())), "the warm-up trains the critic"
        assert all(torch.equal(a, p) for a, p in zip(lora_before, trainer.pipeline.lora_parameters())), "and nothing else"
        return out

    monkeypatch.setattr(trainer, "warm_up_critic", spy)
    trainer.train()
    assert len(calls) == 1
    assert set(calls[0]) == {"critic_warmup_loss_first", "critic_warmup_loss_last"}
    assert trainer._value_offset is not None
    # a run that resumes past its first update does not warm up again
    other = make_trainer(tmp_path, tiny_pipeline, value_warmup_trajectories=3, value_warmup_steps=4)
    monkeypatch.setattr(other, "warm_up_critic", lambda: pytest.fail("warmed up on resume"))
    other.step(1, 4)


def test_warm_up_settings_are_checked():
    with pytest.raises(ValueError, match="value_warmup_steps"):
        NablaGFlowNetConfig(flow_estimator="monte_carlo", value_warmup_trajectories=8)
    with pytest.raises(ValueError, match="value_warmup_trajectories"):
        NablaGFlowNetConfig(value_warmup_trajectories=8, value_warmup_steps=10)
    with pytest.raises(ValueError, match="value_baseline"):
        NablaGFlowNetConfig(flow_estimator="monte_carlo", value_baseline="reward")
