"""flow_head_trajectories='reference_resampled': the flow head's reverse and terminal terms on reference trajectories
drawn ∝ exp(β r(x_0)) (the target's path measure), against independent formulas; the resampling's statistics; that the
flow head's gradient no longer depends on the policy's trajectories; the config's refusals."""

import dataclasses
import math

import pytest
import torch

from trl_gfn import DiffusionPipelineForRL, NablaGFlowNetConfig, NablaGFlowNetTrainer, TransitionBatch
from trl_gfn.diffusion import predict_x0
from trl_gfn.testing import BrightnessReward, reset_accelerate_state, tiny_stable_diffusion
from trl_gfn.trainers.reference_flow import REFERENCE_LATENTS, group_keys, resample_in_groups

PROMPTS = ["a red cat", "a blue dog"]
K = 4


def _trainer(tmp_path, **overrides):
    reset_accelerate_state()
    kwargs = dict(sample_num_steps=K, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2, train_max_grad_norm=0.0,
                  logdir=str(tmp_path), save_freq=0, log_image_freq=0, sample_guidance_scale=3.0, train_timestep_fraction=1.0,
                  flow_block_out_channels=[8, 16], flow_attention_head_dim=4, reward_scale=30.0, unet_reg_scale=1.0,
                  flow_head_trajectories="reference_resampled")
    kwargs.update(overrides)
    trainer = NablaGFlowNetTrainer(NablaGFlowNetConfig(**kwargs), BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion(seed=0)),
                                   prompt_function=PROMPTS)
    torch.manual_seed(3)
    for p in trainer.pipeline.lora_parameters():
        torch.nn.init.normal_(p, std=0.1)
    return trainer


def test_resampling_draws_within_the_group_in_proportion_to_the_weights():
    log_w = torch.tensor([0.0, math.log(3.0), 5.0, 0.0])
    keys = ["a", "a", "b", "b"]
    gen = torch.Generator().manual_seed(0)
    chosen, ess = resample_in_groups(log_w, keys, ["a"] * 4000 + ["b"], gen)
    assert set(chosen[:4000].tolist()) <= {0, 1} and chosen[4000].item() in (2, 3)
    share = (chosen[:4000] == 1).float().mean().item()
    assert abs(share - 0.75) < 0.03, share  # weights 1 : 3 within group "a"
    assert ess["a"] == pytest.approx(1 / (0.25**2 + 0.75**2))
    assert ess["b"] == pytest.approx(1 / ((1 / (1 + math.exp(-5))) ** 2 + (1 / (1 + math.exp(5))) ** 2))
    with pytest.raises(RuntimeError, match="no reference candidate"):
        resample_in_groups(log_w, keys, ["c"], gen)
    # metadata separates groups; key order inside a metadata dict does not
    assert group_keys(["p", "p"], [{"a": 1, "b": 2}, {"b": 2, "a": 1}]) == group_keys(["p", "p"], [{"a": 1, "b": 2}] * 2)
    assert len(set(group_keys(["p", "p"], [{"u": 1}, {"u": 2}]))) == 2


def test_attached_trajectories_are_the_reference_models_and_favour_high_reward(tmp_path):
    trainer = _trainer(tmp_path, flow_reference_candidates=3)
    samples = trainer.sample_epoch(0)
    logged = []
    trainer.log = lambda logs, step=None: logged.append(dict(logs))
    out = trainer.prepare_training_samples(samples)
    ref = out.extras[REFERENCE_LATENTS]
    assert ref.shape == samples.latents.shape
    # sampled with the adapter off: the same as sampling with a zero LoRA; the policy's own trajectories differ
    again = trainer.attach_reference_trajectories(dataclasses.replace(samples, extras={}), 0).extras[REFERENCE_LATENTS]
    torch.testing.assert_close(again, ref)
    for p in trainer.pipeline.lora_parameters():
        torch.nn.init.zeros_(p)
    zero_lora = trainer.attach_reference_trajectories(dataclasses.replace(samples, extras={}), 0).extras[REFERENCE_LATENTS]
    torch.testing.assert_close(zero_lora, ref)
    assert not torch.allclose(ref, samples.latents)
    assert "flow_reference_ess" in logged[0] and 1 <= logged[0]["flow_reference_ess"] <= 3


def _batch(trainer, tmp_path):
    samples = trainer.prepare_training_samples(trainer.sample_epoch(0))
    steps = torch.arange(K).repeat(len(samples))
    rows = torch.arange(len(samples)).repeat_interleave(K)
    return samples, TransitionBatch.from_trajectories(samples, steps, rows=rows)


def test_reverse_target_is_the_reference_vjp_of_the_next_flow_minus_the_guess(tmp_path):
    """With the flow head at zero the reverse loss is mean σ²‖J_refᵀ β γ ∇r(x̂_0(x')) − β γ ∇r(x̂_0(x_k))‖² over the paired
    reference transitions (β∇r(x_0) at x_0), computed here as the autograd VJP of the reference step mean; with
    train_policy_on_reference_trajectories the forward term there is mean σ²‖coef_eps(ε̂_θ − ε̂_ref)/σ² − f(x')‖²."""
    trainer = _trainer(tmp_path, train_policy_on_reference_trajectories=True)
    torch.nn.init.zeros_(trainer.flow_head.unet.conv_out.weight)
    torch.nn.init.zeros_(trainer.flow_head.unet.conv_out.bias)
    samples, batch = _batch(trainer, tmp_path)
    loss_reverse, loss_terminal, loss_forward = trainer.reference_flow_terms(batch)
    assert loss_terminal.item() == 0.0
    sched, c = trainer.schedule, trainer.config
    idx = batch.step_index
    ref = batch.extras[REFERENCE_LATENTS]
    x, x_next = ref[torch.arange(len(idx)), idx].float(), ref[torch.arange(len(idx)), idx + 1].float()
    emb, neg = batch.prompt_embeds, batch.negative_prompt_embeds
    t, a = sched.timesteps[idx], sched.level(idx, like=x)
    cx, ce, std = (sched.gather(n, idx, like=x) for n in ("coef_x", "coef_eps", "std"))

    def mean_ref(z):
        with trainer.pipeline.reference_mode():
            eps = trainer.pipeline.guided_epsilon(trainer.pipeline.denoiser, z, t, emb, neg, c.sample_guidance_scale, a, sched.prediction_type)
        return cx * z + ce * eps

    def guess_at(z, position):  # β γ ∇_z r(decode(x̂_0^ref(z))), with the Jacobian of x̂_0
        z = z.detach().requires_grad_(True)
        final = position == K
        with torch.enable_grad(), trainer.pipeline.reference_mode():
            eps = trainer.pipeline.guided_epsilon(trainer.pipeline.denoiser, z, sched.timesteps[position.clamp(max=K - 1)], emb, neg,
                                                  c.sample_guidance_scale, sched.level(position, like=z), sched.prediction_type)
            x0 = torch.where(final.view(-1, 1, 1, 1), z, predict_x0(z, eps, sched.level(position, like=z)))
            r = BrightnessReward().score(trainer.pipeline.decode(x0), list(batch.prompts), list(batch.prompt_metadata))
            (g,) = torch.autograd.grad(r.sum(), z)
        gamma = torch.where(final, torch.ones_like(position, dtype=torch.float32), sched.level(position, like=z).alpha_bar.flatten())
        return c.reward_scale * gamma.view(-1, 1, 1, 1) * g

    f_next = guess_at(x_next, idx + 1)
    z = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (pulled,) = torch.autograd.grad(mean_ref(z), z, grad_outputs=f_next)  # J_refᵀ f(x'), plain autograd
    target = pulled - guess_at(x, idx)
    expected = (std**2 * target**2).mean()
    assert expected > 0
    torch.testing.assert_close(loss_reverse, expected, rtol=2e-4, atol=0)
    with torch.no_grad():
        eps = trainer.pipeline.guided_epsilon(trainer.pipeline.denoiser, x, t, emb, neg, c.sample_guidance_scale, a, sched.prediction_type)
        with trainer.pipeline.reference_mode():
            eps_ref = trainer.pipeline.guided_epsilon(trainer.pipeline.denoiser, x, t, emb, neg, c.sample_guidance_scale, a, sched.prediction_type)
    residual = (cx * x + ce * eps - (cx * x + ce * eps_ref)) / std**2  # (μ_θ − μ_ref)/σ², here as a difference of means
    expected_forward = (std**2 * (residual - f_next) ** 2).mean()
    torch.testing.assert_close(loss_forward, expected_forward, rtol=2e-3, atol=0)


def test_location_target_is_the_maximum_likelihood_residual(tmp_path):
    """reference_forward_target='location': the reference rows' forward term is mean σ²‖(μ_θ(x_k) − x_{k-1})/σ²‖², the
    diffusion model's Gaussian log-likelihood of the resampled reference step (up to constants), independent of the flow."""
    trainer = _trainer(tmp_path, train_policy_on_reference_trajectories=True, reference_forward_target="location")
    torch.nn.init.normal_(trainer.flow_head.unet.conv_out.weight, std=0.05)
    samples, batch = _batch(trainer, tmp_path)
    _, _, loss_forward = trainer.reference_flow_terms(batch)
    sched, c = trainer.schedule, trainer.config
    idx = batch.step_index
    ref = batch.extras[REFERENCE_LATENTS]
    x, x_next = ref[torch.arange(len(idx)), idx].float(), ref[torch.arange(len(idx)), idx + 1].float()
    t, a = sched.timesteps[idx], sched.level(idx, like=x)
    cx, ce, std = (sched.gather(n, idx, like=x) for n in ("coef_x", "coef_eps", "std"))
    with torch.no_grad():
        eps = trainer.pipeline.guided_epsilon(trainer.pipeline.denoiser, x, t, batch.prompt_embeds, batch.negative_prompt_embeds,
                                              c.sample_guidance_scale, a, sched.prediction_type)
    expected = (std**2 * ((cx * x + ce * eps - x_next) / std**2) ** 2).mean()
    torch.testing.assert_close(loss_forward, expected, rtol=2e-3, atol=0)
    torch.nn.init.normal_(trainer.flow_head.unet.conv_out.weight, std=0.5)  # the flow head does not enter it
    torch.testing.assert_close(trainer.reference_flow_terms(batch)[2], loss_forward, rtol=1e-5, atol=0)
    with pytest.warns(UserWarning, match="reference_forward_target"):
        NablaGFlowNetConfig(reference_forward_target="location")


def test_flow_head_gradient_does_not_depend_on_the_policys_trajectories(tmp_path):
    """The flow head learns from the reference rows only: moving the policy's states changes the LoRA's gradient, not the
    flow head's; with flow_head_trajectories='policy' it changes both."""

    def grads(trainer, batch):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, terms = trainer.compute_loss(batch)
        loss.backward()
        head = torch.cat([p.grad.flatten() for p in trainer.flow_head.parameters() if p.grad is not None])
        lora = torch.cat([p.grad.flatten() for p in trainer.pipeline.lora_parameters() if p.grad is not None])
        return head, lora, terms

    for mode in ("reference_resampled", "policy"):
        trainer = _trainer(tmp_path / mode, flow_head_trajectories=mode)
        torch.nn.init.normal_(trainer.flow_head.unet.conv_out.weight, std=0.05)
        samples, batch = _batch(trainer, tmp_path)
        head, lora, terms = grads(trainer, batch)
        moved = dataclasses.replace(batch, latents=batch.latents + 0.3 * torch.randn_like(batch.latents),
                                    next_latents=batch.next_latents + 0.3 * torch.randn_like(batch.next_latents))
        head2, lora2, _ = grads(trainer, moved)
        assert head.norm() > 0 and terms["loss_reverse"] > 0
        assert (lora2 - lora).norm() > 1e-3 * lora.norm()
        if mode == "reference_resampled":
            torch.testing.assert_close(head2, head, rtol=1e-5, atol=1e-8)
        else:
            assert (head2 - head).norm() > 1e-3 * head.norm()


def test_training_moves_the_flow_head_towards_the_reference_target(tmp_path):
    """A few epochs: the flow head's reverse loss on the (fixed-seed) reference rows falls."""
    trainer = _trainer(tmp_path, num_epochs=6, train_learning_rate=1e-4, flow_learning_rate=3e-3)
    torch.nn.init.normal_(trainer.flow_head.unet.conv_out.weight, std=0.05)
    _, batch = _batch(trainer, tmp_path)
    before = trainer.reference_flow_terms(batch)[0].item()
    trainer.train()
    after = trainer.reference_flow_terms(batch)[0].item()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("field,value", [("use_flow_head", False), ("flow_estimator", "monte_carlo"), ("flow_guess_model", "policy"),
                                         ("reverse_loss_type", "score"), ("importance_weighting", "linearised"),
                                         ("train_flow_head_on_forward_loss", True), ("pretrained_strength", 0.5)])
def test_config_refuses_incompatible_fields(field, value):
    kwargs = {field: value}
    if field == "use_flow_head":
        kwargs["reverse_loss_scale"] = 0.0
    with pytest.raises(ValueError, match=field):
        NablaGFlowNetConfig(flow_head_trajectories="reference_resampled", **kwargs)


def test_config_checks_candidates_and_warns_when_unused():
    with pytest.raises(ValueError, match="flow_reference_candidates"):
        NablaGFlowNetConfig(flow_head_trajectories="reference_resampled", flow_reference_candidates=0)
    with pytest.raises(ValueError, match="flow_head_trajectories"):
        NablaGFlowNetConfig(flow_head_trajectories="reference")
    with pytest.raises(ValueError, match="train_policy_on_reference_trajectories"):
        NablaGFlowNetConfig(train_policy_on_reference_trajectories=True)
    with pytest.warns(UserWarning, match="flow_reference_candidates"):
        NablaGFlowNetConfig(flow_reference_candidates=4)
