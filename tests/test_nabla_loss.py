"""The residual ∇-DB loss: terms vanish where the theory says, and move exactly as DESIGN §2 says."""

import pytest
import torch

from trl_gfn import NablaGFlowNetConfig, NablaGFlowNetTrainer, TransitionBatch
from trl_gfn.diffusion import predict_x0

from trl_gfn.testing import BrightnessReward, PromptAwareReward

PROMPTS = ["a red cat", "a blue dog"]


def make_trainer(tmp_path, pipeline, reward=None, **overrides):
    kwargs = dict(sample_num_steps=6, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2, logdir=str(tmp_path),
                  flow_block_out_channels=[8, 16], flow_attention_head_dim=4, save_freq=0, log_image_freq=0, reward_scale=0.0,
                  unet_reg_scale=1.0, sample_guidance_scale=3.0)
    kwargs.update(overrides)
    return NablaGFlowNetTrainer(NablaGFlowNetConfig(**kwargs), reward or BrightnessReward(), pipeline, prompt_function=PROMPTS)


def batch_at(samples, step):
    return TransitionBatch.from_trajectories(samples, torch.full((len(samples),), step))


def independent_reward_grad(trainer, x, step_index, prompts):
    """∇_x r(decode(x̂_0(x))) by plain autograd through the whole chain (no VJP split)."""
    pipe, sched = trainer.pipeline, trainer.schedule
    x = x.detach().clone().requires_grad_(True)
    if step_index == sched.num_steps:  # x is the final sample x_0
        x0 = x
    else:
        t = sched.timesteps[step_index].repeat(len(x))
        a = sched.alphas_cumprod[step_index].float()
        neg = pipe.encode_prompts([""]).expand(len(x), -1, -1)
        eps = pipe.guided_epsilon(pipe.unet, x, t, pipe.encode_prompts(prompts), neg, trainer.config.sample_guidance_scale, a, "epsilon")
        x0 = predict_x0(x, eps, a)
    rewards, _ = trainer.reward_fn(pipe.decode(x0), prompts, [{}] * len(x))
    return torch.autograd.grad(rewards.sum(), x)[0]


@pytest.mark.parametrize("step", [2, 5])
def test_all_terms_vanish_at_initialisation_with_zero_reward_scale(tmp_path, tiny_pipeline, step):
    trainer = make_trainer(tmp_path, tiny_pipeline)
    samples = trainer.sample_epoch(0)
    loss, terms = trainer.compute_loss(batch_at(samples, step))
    assert terms["loss_forward"].item() == 0.0  # policy == reference, g == 0, beta == 0
    assert terms["loss_reverse"].item() == 0.0
    assert terms["loss_terminal"].item() == 0.0
    assert terms["loss_reg"].item() < 1e-10  # eps recorded while sampling == eps recomputed now
    assert terms["norm_forward_target"].item() > 1.0  # the target itself is far from zero: the loss is not trivially 0


@pytest.mark.parametrize("step", [1, 5])
def test_forward_target_moves_by_beta_gamma_grad_r(tmp_path, tiny_pipeline, step):
    beta = 50.0
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=beta)
    samples = trainer.sample_epoch(0)
    batch = batch_at(samples, step)
    _, terms = trainer.compute_loss(batch)
    grad = independent_reward_grad(trainer, batch.next_latents, step + 1, batch.prompts)
    gamma = trainer.schedule.alphas_cumprod[step + 1].float()  # "squared": gamma = alpha_bar of x_{k-1}
    expected = ((beta * gamma * grad) ** 2).mean()
    torch.testing.assert_close(terms["loss_forward"], expected, rtol=1e-4, atol=0)
    assert expected > 0


def test_sqrt_scaling_divides_the_guess_by_sqrt_alpha(tmp_path, tiny_pipeline):
    squared = make_trainer(tmp_path / "a", tiny_pipeline, reward_scale=10.0)
    samples = squared.sample_epoch(0)
    batch = batch_at(samples, 2)
    _, t_sq = squared.compute_loss(batch)
    squared.config.reward_gradient_scaling = "sqrt"
    _, t_sqrt = squared.compute_loss(batch)
    a = squared.schedule.alphas_cumprod[3].float()
    torch.testing.assert_close(t_sqrt["norm_reward_guess"] / t_sq["norm_reward_guess"], 1 / a.sqrt(), rtol=1e-4, atol=0)


def test_reward_gradient_uses_each_samples_own_prompt(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, PromptAwareReward(), reward_scale=1.0)
    samples = trainer.sample_epoch(0)
    batch = batch_at(samples, 3)
    together = trainer.next_state_reward_gradient(batch)
    for i in range(2):
        alone = trainer.next_state_reward_gradient(batch_at(samples.select([i]), 3))
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-7)
        own = independent_reward_grad(trainer, batch.next_latents[i:i + 1], 4, [batch.prompts[i]])
        torch.testing.assert_close(alone, own, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(together[0], together[1])


def test_jacobian_free_gradient_treats_recorded_epsilon_as_constant(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=1.0, jacobian_free_reward_gradient=True)
    samples = trainer.sample_epoch(0)
    batch = batch_at(samples, 2)
    got = trainer.next_state_reward_gradient(batch)
    a = trainer.schedule.alphas_cumprod[3].float()
    x0 = predict_x0(batch.next_latents, samples.epsilons[:, 3], a).detach().requires_grad_(True)
    rewards, _ = trainer.reward_fn(trainer.pipeline.decode(x0), batch.prompts, [{}, {}])
    expected = torch.autograd.grad(rewards.sum(), x0)[0] / a.sqrt()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    exact = independent_reward_grad(trainer, batch.next_latents, 3, batch.prompts)
    assert not torch.allclose(got, exact, rtol=1e-3)  # an approximation, not the exact gradient


def _randomise_flow_head(trainer):
    torch.manual_seed(3)
    conv = trainer.flow_head.unet.conv_out
    torch.nn.init.normal_(conv.weight, std=0.05)
    torch.nn.init.normal_(conv.bias, std=0.05)


def test_terminal_and_reverse_terms_measure_the_flow_head(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline)
    _randomise_flow_head(trainer)
    samples = trainer.sample_epoch(0)
    head, emb, sched = trainer.flow_head, samples.prompt_embeds, trainer.schedule
    # last transition: terminal = mean g(x_0, 0)^2, no reverse term, no g in the forward target
    last = batch_at(samples, 5)
    _, terms = trainer.compute_loss(last)
    with torch.no_grad():
        g0 = head(last.next_latents, torch.zeros(2, dtype=torch.long), emb)
    torch.testing.assert_close(terms["loss_terminal"], (g0**2).mean(), rtol=1e-5, atol=0)
    assert terms["loss_reverse"].item() == 0.0 and terms["loss_forward"].item() == 0.0
    # interior: forward = mean g(x_{k-1})^2 and reverse = mean g(x_k)^2 when policy == reference and beta == 0
    mid = batch_at(samples, 2)
    _, terms = trainer.compute_loss(mid)
    with torch.no_grad():
        g_next = head(mid.next_latents, sched.timesteps[3].repeat(2), emb)
        g_cur = head(mid.latents, sched.timesteps[2].repeat(2), emb)
    torch.testing.assert_close(terms["loss_forward"], (g_next**2).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["loss_reverse"], (g_cur**2).mean(), rtol=1e-4, atol=1e-12)
    assert terms["loss_terminal"].item() == 0.0


def test_reverse_term_trains_only_the_flow_head(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=5.0)
    _randomise_flow_head(trainer)
    torch.manual_seed(4)
    for p in trainer.pipeline.lora_parameters():  # move the policy away from the reference
        torch.nn.init.normal_(p, std=0.02)
    samples = trainer.sample_epoch(0)
    batch = batch_at(samples, 2)

    def grads(reverse_scale):
        trainer.config.reverse_loss_scale = reverse_scale
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, terms = trainer.compute_loss(batch)
        loss.backward()
        lora = torch.cat([p.grad.flatten() for p in trainer.pipeline.lora_parameters()])
        flow = torch.cat([p.grad.flatten() for p in trainer.flow_head.parameters() if p.grad is not None])
        return lora, flow, terms

    lora_on, flow_on, terms = grads(1.0)
    lora_off, flow_off, _ = grads(0.0)
    assert terms["loss_reverse"] > 0
    torch.testing.assert_close(lora_on, lora_off, rtol=1e-5, atol=1e-9)
    assert (flow_on - flow_off).abs().max() > 1e-6


def test_transition_selection(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, sample_num_steps=10, train_timestep_fraction=0.3)
    assert trainer.config.num_train_timesteps == 4
    samples = trainer.sample_epoch(0)
    steps = trainer.select_transitions(samples, epoch=0, inner_epoch=0)
    assert steps.shape == (2, 4)
    assert (steps[:, -1] == 9).all()
    for row in steps.tolist():  # stratified: one pick in each of [0,3), [3,6), [6,9)
        assert 0 <= row[0] < 3 <= row[1] < 6 <= row[2] < 9
    assert torch.equal(steps, trainer.select_transitions(samples, epoch=0, inner_epoch=0))
    trainer.config.low_var_subsampling = False
    uniform = trainer.select_transitions(samples, epoch=0, inner_epoch=0)
    for row in uniform.tolist():
        assert row[-1] == 9 and len(set(row)) == 4 and max(row[:-1]) < 9 and row[:-1] == sorted(row[:-1])


def test_v_prediction_models_train_with_the_same_guarantees(tmp_path):
    from trl_gfn import DiffusionPipelineForRL
    from trl_gfn.testing import tiny_stable_diffusion

    trainer = make_trainer(tmp_path, DiffusionPipelineForRL(tiny_stable_diffusion(prediction_type="v_prediction")))
    assert trainer.schedule.prediction_type == "v_prediction"
    samples = trainer.sample_epoch(0)
    _, terms = trainer.compute_loss(batch_at(samples, 2))
    assert terms["loss_forward"].item() == 0.0 and terms["loss_reg"].item() < 1e-10


def test_variance_weighting_scales_each_transition_by_its_variance(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=50.0)
    _randomise_flow_head(trainer)
    samples = trainer.sample_epoch(0)
    for step in (1, 5):
        batch = batch_at(samples, step)
        trainer.config.transition_loss_weighting = "none"
        _, plain = trainer.compute_loss(batch)
        trainer.config.transition_loss_weighting = "variance"
        _, weighted = trainer.compute_loss(batch)
        variance = trainer.schedule.std[step].float() ** 2
        for key in ("loss_forward", "loss_reverse"):
            torch.testing.assert_close(weighted[key], plain[key] * variance, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(weighted["loss_terminal"], plain["loss_terminal"])
    assert plain["loss_forward"] > 0
