"""The transition maths reproduces diffusers' own ``scheduler.step`` and autograd of the Gaussian density."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from trl_gfn.diffusion import (
    log_prob,
    make_scheduler,
    model_output_to_epsilon,
    predict_x0,
    score_current,
    score_next,
    step_mean,
    transition_schedule,
)

SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, clip_sample=False,
)


def _base(prediction_type="epsilon"):
    return DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)


@pytest.mark.parametrize("sampler,num_steps,eta", [("ddpm", 50, 1.0), ("ddpm", 10, 0.5), ("dpm_solver_sde", 20, 1.0)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_matches_diffusers_scheduler_step(sampler, num_steps, eta, prediction_type):
    torch.manual_seed(0)
    ours = make_scheduler(_base(prediction_type), sampler, eta)
    schedule = transition_schedule(ours, num_steps, eta)
    reference = make_scheduler(_base(prediction_type), sampler, eta)
    reference.set_timesteps(num_steps)
    assert torch.equal(schedule.timesteps, reference.timesteps.to(torch.int64))
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    for i, t in enumerate(reference.timesteps):
        out = torch.randn_like(x)
        noise = torch.randn_like(x)
        kwargs = {"eta": eta} if sampler == "ddpm" else {}
        expected = reference.step(out, t, x, variance_noise=noise, **kwargs).prev_sample
        idx = torch.full((3,), i)
        a = schedule.gather("alphas_cumprod", idx, like=x)
        eps = model_output_to_epsilon(out, x, a, schedule.prediction_type)
        mean = step_mean(x, eps, schedule.gather("coef_x", idx, like=x), schedule.gather("coef_eps", idx, like=x))
        ours_next = mean + schedule.gather("std", idx, like=x) * noise
        torch.testing.assert_close(ours_next, expected.to(x.dtype), rtol=1e-5, atol=1e-5)
        x = expected.to(x.dtype)
    assert (schedule.std > 0).all(), "every step must be stochastic"


def test_alphas_and_x0_of_ddim():
    scheduler = make_scheduler(_base(), "ddpm")
    schedule = transition_schedule(scheduler, 50)
    assert schedule.timesteps[0] == 981 and schedule.timesteps[-1] == 1
    torch.testing.assert_close(schedule.alphas_cumprod[:-1], scheduler.alphas_cumprod[schedule.timesteps].double())
    torch.testing.assert_close(schedule.alphas_cumprod[-1], scheduler.final_alpha_cumprod.double())
    assert schedule.next_timesteps[-1] == 0 and schedule.next_timesteps[0] == 961
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x0)
    a = torch.tensor(0.3, dtype=torch.float64)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(predict_x0(xt, eps, a), x0)


def test_scores_equal_autograd_of_gaussian_log_density():
    torch.manual_seed(1)
    scheduler = make_scheduler(_base(), "ddpm")
    schedule = transition_schedule(scheduler, 10)
    idx = torch.tensor([0, 4, 9])
    shape = (3, 2, 4, 4)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, 32, dtype=torch.float64) * 0.3
    eps = (x.flatten(1) @ w).view(shape)  # a linear "model", so the analytic Jacobian is known
    cx = schedule.gather("coef_x", idx, like=x)
    ce = schedule.gather("coef_eps", idx, like=x)
    std = schedule.gather("std", idx, like=x)
    mean = step_mean(x, eps, cx, ce)
    x_next = (mean + std * torch.randn(shape, dtype=torch.float64)).detach().requires_grad_(True)

    lp = log_prob(x_next, mean, std)
    g_next, g_cur = torch.autograd.grad(lp.sum(), [x_next, x], retain_graph=True)
    torch.testing.assert_close(score_next(x_next, mean, std), g_next)
    torch.testing.assert_close(score_current(x_next, mean, std, x), g_cur)
    # analytic: J^T (x_next - mean) / std^2 with J = cx I + ce W^T
    r = ((x_next - mean) / std**2).detach().flatten(1)
    analytic = cx.flatten(1) * r + ce.flatten(1) * (r @ w.T)
    torch.testing.assert_close(g_cur.flatten(1), analytic)
    # and the log-density itself against torch.distributions
    dist = torch.distributions.Normal(mean, std.expand_as(mean))
    torch.testing.assert_close(lp, dist.log_prob(x_next).flatten(1).sum(1))


def test_unsupported_schedulers_raise():
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_scheduler(_base(), "euler")
    with pytest.raises(ValueError, match="sample_eta"):
        make_scheduler(_base(), "ddpm", eta=0.0)
    with pytest.raises(ValueError, match="thresholding"):
        make_scheduler(DDPMScheduler(thresholding=True), "ddpm")
    with pytest.raises(ValueError, match="unsupported scheduler"):
        transition_schedule(EulerDiscreteScheduler(), 10)


def test_a_deterministic_ddim_step_is_refused_by_name():
    """A stochastic DDIM step with std 0 has no log-density (DDPO's ratio and the ∇-DB residuals divide by it): refused."""
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        make_scheduler(DDIMScheduler(**dict(SD_SCHEDULER, set_alpha_to_one=True)), "ddpm")
    # a base scheduler without the key is built with set_alpha_to_one=False; without steps_offset its last step starts at
    # τ = 0, where ᾱ does not change: refused, naming the timestep
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert "set_alpha_to_one" not in DDPMScheduler(**base).config
    with pytest.raises(ValueError, match=r"timestep\(s\) \[0\] are deterministic"):
        transition_schedule(make_scheduler(DDPMScheduler(**base), "ddpm"), 10)
    schedule = transition_schedule(make_scheduler(DDPMScheduler(**base, steps_offset=1), "ddpm"), 10)
    assert bool((schedule.std > 0).all())
