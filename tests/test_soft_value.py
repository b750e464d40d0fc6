"""The Monte-Carlo ground truth of the residual flow gradient (trl_gfn.evaluation.soft_value)."""

import pytest
import torch

from trl_gfn import NablaGFlowNetConfig, NablaGFlowNetTrainer
from trl_gfn.evaluation.soft_value import flow_gradient_report, soft_value_gradient
from trl_gfn.testing import BrightnessReward

PROMPT = "a red cat"


@pytest.fixture()
def setup(tiny_pipeline):
    schedule = tiny_pipeline.make_schedule("ddpm", 5, 1.0)
    traj = tiny_pipeline.sample([PROMPT] * 2, schedule, guidance_scale=2.0, generators=[torch.Generator().manual_seed(i) for i in range(2)])
    return tiny_pipeline, schedule, traj


def estimate(pipeline, schedule, x, position, beta, **kw):
    kw.setdefault("num_rollouts", 256)
    kw.setdefault("chunk_size", 64)
    return soft_value_gradient(pipeline, schedule, BrightnessReward(), x, position, prompts=[PROMPT] * len(x), guidance_scale=2.0,
                               beta=beta, **kw)


def test_at_the_final_sample_it_is_beta_grad_r_exactly(setup):
    pipeline, schedule, traj = setup
    x0 = traj.latents[:, -1]
    est = estimate(pipeline, schedule, x0, schedule.num_steps, beta=3.0)
    y = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(BrightnessReward()(pipeline.decode(y), [PROMPT] * 2, [{}, {}])[0].sum(), y)
    torch.testing.assert_close(est.grad, 3.0 * g, rtol=1e-5, atol=1e-8)
    assert torch.equal(est.optimal_score_residual, torch.zeros_like(x0))


def test_score_and_pathwise_estimators_agree(setup):
    """Two derivations (likelihood ratio at the first step vs reparameterised rollouts) of the same gradient agree
    within their Monte-Carlo errors (β large enough that the tiny model's gradient stands above the noise)."""
    pipeline, schedule, traj = setup
    x = traj.latents[:1, 1]
    score = estimate(pipeline, schedule, x, 1, beta=3000.0, estimator="score", num_rollouts=4096, chunk_size=1024, seed=1)
    path = estimate(pipeline, schedule, x, 1, beta=3000.0, estimator="pathwise", num_rollouts=128, seed=2)
    diff = (score.grad - path.grad).flatten(1).norm(dim=1)
    err = (score.stderr**2 + path.stderr**2).sqrt()
    assert (diff < 3 * err).all(), (diff, err)
    assert (path.grad.flatten(1).norm(dim=1) > 10 * path.stderr).all()  # a gradient well above its own noise
    cos = torch.nn.functional.cosine_similarity(score.grad.flatten(1), path.grad.flatten(1), dim=1)
    assert (cos > 0.8).all(), cos


def test_zero_beta_gives_a_flat_flow_and_the_reference_step(setup):
    pipeline, schedule, traj = setup
    x = traj.latents[:, 2]
    est = estimate(pipeline, schedule, x, 2, beta=0.0, num_rollouts=512, chunk_size=128)
    assert torch.allclose(est.log_value, torch.zeros(2), atol=1e-6) and torch.allclose(est.ess, torch.full((2,), 512.0))
    # μ* is the plain mean of the reference's next states: within Monte-Carlo error of μ_ref, i.e. residual ~ 1/(σ sqrt(n))
    std = float(schedule.std[2])
    per_element = est.optimal_score_residual.flatten(1).pow(2).mean(1).sqrt()
    assert (per_element < 4 / (std * 512**0.5)).all()


def test_bad_arguments_are_named(setup):
    pipeline, schedule, traj = setup
    with pytest.raises(ValueError, match="position"):
        estimate(pipeline, schedule, traj.latents[:, 0], schedule.num_steps + 1, beta=1.0)
    with pytest.raises(ValueError, match="num_rollouts"):
        estimate(pipeline, schedule, traj.latents[:, 0], 1, beta=1.0, num_rollouts=100, chunk_size=64)
    with pytest.raises(ValueError, match="estimator"):
        estimate(pipeline, schedule, traj.latents[:, 0], 1, beta=1.0, estimator="reinforce")


def test_report_compares_a_trainers_estimate_with_the_truth(tmp_path, tiny_pipeline):
    config = NablaGFlowNetConfig(sample_num_steps=5, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                                 logdir=str(tmp_path), flow_block_out_channels=[8, 16], flow_attention_head_dim=4, save_freq=0,
                                 log_image_freq=0, reward_scale=20.0, sample_guidance_scale=2.0)
    trainer = NablaGFlowNetTrainer(config, BrightnessReward(), tiny_pipeline, prompt_function=[PROMPT])
    samples = trainer.sample_epoch(0)
    prompts = [PROMPT] * len(samples)
    estimators = {"guess": lambda x, p: trainer.flow_gradient(x, p, prompts, include_flow_head=False)}
    residuals = {"policy": lambda x, p: trainer.policy_score_residual(x, p, prompts)}
    truths = {}
    rows = flow_gradient_report(estimators, trainer.pipeline, trainer.schedule, trainer.reward_fn, samples.latents, [3, 5], prompts=prompts,
                                guidance_scale=2.0, beta=20.0, num_rollouts=128, chunk_size=64, residual_estimators=residuals, truths=truths)
    assert [r["position"] for r in rows] == [3, 5] and set(truths) == {3, 5}
    final = rows[1]
    assert final["guess_rel_error"] < 1e-3 and final["guess_cosine"] > 0.9999  # at x_0 the guess is β ᾱ_0 ∇r, ᾱ_0 = 0.999
    assert rows[0]["policy_norm"] == 0.0 and rows[0]["policy_rel_error"] == pytest.approx(1.0)  # untrained policy: no shift
    again = flow_gradient_report(estimators, trainer.pipeline, trainer.schedule, trainer.reward_fn, samples.latents, [3], prompts=prompts,
                                 guidance_scale=2.0, beta=20.0, truths=truths)
    assert again[0]["true_norm"] == rows[0]["true_norm"]  # reused, not recomputed
