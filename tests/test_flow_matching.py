"""Flow-matching (SD3) transition maths: the ODE step against diffusers, the SDE step against its drift and
diffusion written out independently, and the SDE's marginals against the data on a toy model whose exact
velocity is known in closed form."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trl_gfn.diffusion import log_prob, score_residual, step_mean
from trl_gfn.diffusion import (
    MEMORYLESS_NOISE_LEVEL,
    score_current,
    score_next,
    flow_ode_step,
    flow_sde_coefficients,
    flow_sde_noise_scale,
    flow_sde_step_mean,
    flow_transition_schedule,
    velocity_to_epsilon,
    velocity_to_x0,
)

SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # stable-diffusion-3-medium's scheduler config


# ---------------------------------------------------------------- a toy model with an exact velocity field
# data: 1-D mixture sum_k pi_k N(mu_k, s_k^2); x_sigma = (1 - sigma) x_0 + sigma eps, so given component k,
# x_sigma ~ N((1 - sigma) mu_k, V_k), V_k = (1 - sigma)^2 s_k^2 + sigma^2, and
# E[eps - x_0 | x, k] = (sigma - (1 - sigma) s_k^2) / V_k * (x - (1 - sigma) mu_k) - mu_k.
PI = torch.tensor([0.3, 0.7], dtype=torch.float64)
MU = torch.tensor([-2.0, 1.5], dtype=torch.float64)
S = torch.tensor([0.5, 0.4], dtype=torch.float64)
DATA_MEAN = float((PI * MU).sum())
DATA_VAR = float((PI * (S**2 + MU**2)).sum()) - DATA_MEAN**2
SPLIT = -0.25  # between the modes: the fraction of samples below it is the first mode's weight (0.3)


def _log_marginal(x, sigma):
    m, var = (1 - sigma) * MU, (1 - sigma) ** 2 * S**2 + sigma**2
    return torch.logsumexp(torch.log(PI) - 0.5 * (x[:, None] - m) ** 2 / var - 0.5 * torch.log(2 * math.pi * var), dim=1)


def _exact_velocity(x, sigma):
    m, var = (1 - sigma) * MU, (1 - sigma) ** 2 * S**2 + sigma**2
    d = x[:, None] - m
    resp = torch.softmax(torch.log(PI) - 0.5 * d**2 / var - 0.5 * torch.log(var), dim=1)
    return (resp * ((sigma - (1 - sigma) * S**2) / var * d - MU)).sum(1)


def _score(x, sigma):
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_log_marginal(x, sigma).sum(), x)
    return grad


def test_toy_velocity_is_consistent_with_the_score():
    """The toy's closed-form velocity satisfies eps_hat = x + (1 - sigma) v = -sigma * score (autograd of log p)."""
    x = torch.linspace(-4, 4, 33, dtype=torch.float64)
    for sigma in (0.05, 0.4, 0.9):
        eps = velocity_to_epsilon(x, _exact_velocity(x, sigma), sigma)
        torch.testing.assert_close(eps, -sigma * _score(x, sigma))


# ---------------------------------------------------------------- the deterministic limit is diffusers' Euler step
@pytest.mark.parametrize("config,num_steps", [(SD3_SCHEDULER, 28), (SD3_SCHEDULER, 5), (dict(shift=1.0), 10)])
def test_noise_level_zero_equals_flow_match_euler_step(config, num_steps):
    torch.manual_seed(0)
    schedule = flow_transition_schedule(FlowMatchEulerDiscreteScheduler(**config), num_steps, noise_level=0.0)
    reference = FlowMatchEulerDiscreteScheduler(**config)
    reference.set_timesteps(num_steps)
    torch.testing.assert_close(schedule.timesteps, reference.timesteps)
    torch.testing.assert_close(schedule.sigmas, reference.sigmas.double())
    assert torch.equal(schedule.std, torch.zeros(num_steps, dtype=torch.float64))
    x = torch.randn(2, 4, 8, 8)
    for i, t in enumerate(reference.timesteps):
        v = torch.randn_like(x)
        expected = reference.step(v, t, x).prev_sample
        idx = torch.full((2,), i)
        ours = step_mean(x, v, schedule.gather("coef_x", idx, like=x), schedule.gather("coef_v", idx, like=x))
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        sigma, sigma_next = reference.sigmas[i], reference.sigmas[i + 1]
        torch.testing.assert_close(flow_ode_step(x, v, sigma, sigma_next), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flow_sde_step_mean(x, v, sigma, sigma_next, 0.0), expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_x0_and_epsilon_from_velocity():
    torch.manual_seed(1)
    x0, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64).view(3, 1, 1, 1)
    xt = (1 - sigma) * x0 + sigma * eps
    v = eps - x0  # the conditional velocity: given (x0, eps), both predictions are exact
    torch.testing.assert_close(velocity_to_x0(xt, v, sigma), x0)
    torch.testing.assert_close(velocity_to_epsilon(xt, v, sigma), eps)


# ---------------------------------------------------------------- mean and std of the SDE step, independently
@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0])
def test_sde_step_matches_drift_and_diffusion_written_out(noise_level):
    """Mean = x + dt (v - g^2/2 * score), std = g sqrt(-dt), g^2 = a^2 sigma / (1 - sigma), with the exact score
    of the toy model from autograd (so eps_hat never enters the reference computation)."""
    K = 12
    schedule = flow_transition_schedule(FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), K, noise_level)
    sigmas = [float(s) for s in schedule.sigmas]
    assert sigmas[0] == 1.0 and schedule.sigma_max == sigmas[1]
    x = torch.linspace(-3, 3, 25, dtype=torch.float64)
    for i in range(K):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        dt = sigma_next - sigma
        g2 = noise_level**2 * sigma / (1 - (sigmas[1] if sigma == 1.0 else sigma))
        v = _exact_velocity(x, sigma)
        expected_mean = x + dt * (v - 0.5 * g2 * _score(x, sigma))
        expected_std = math.sqrt(g2 * -dt)
        mean = schedule.coef_x[i] * x + schedule.coef_v[i] * v
        torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(flow_sde_step_mean(x, v, sigma, sigma_next, noise_level, sigma_max=sigmas[1]), expected_mean)
        assert schedule.std[i].item() == pytest.approx(expected_std, rel=1e-12)
        assert flow_sde_noise_scale(sigma, noise_level, sigmas[1]).item() == pytest.approx(math.sqrt(g2), rel=1e-12)
    assert (schedule.std > 0).all(), "every SDE step must be stochastic (a log-density to train on)"


def test_sde_coefficients_on_random_inputs_in_the_expanded_form():
    """coef_x x + coef_v v against the expanded drift x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt."""
    torch.manual_seed(2)
    x, v = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    sigma = torch.tensor([0.9, 0.5, 0.2, 0.01], dtype=torch.float64).view(4, 1, 1, 1)
    sigma_next = sigma * torch.tensor([0.95, 0.7, 0.5, 0.0], dtype=torch.float64).view(4, 1, 1, 1)
    a = 0.5
    g2 = a**2 * sigma / (1 - sigma)
    dt = sigma_next - sigma
    expected = x * (1 + g2 / (2 * sigma) * dt) + v * (1 + g2 * (1 - sigma) / (2 * sigma)) * dt
    torch.testing.assert_close(flow_sde_step_mean(x, v, sigma, sigma_next, a), expected)
    _, _, std = flow_sde_coefficients(sigma, sigma_next, a)
    torch.testing.assert_close(std, (g2 * -dt).sqrt())


def test_log_density_and_score_residual():
    torch.manual_seed(3)
    schedule = flow_transition_schedule(FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), 10, 0.7)
    idx = torch.tensor([0, 3, 9])
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    v, v_ref = torch.randn_like(x), torch.randn_like(x)
    cx, cv, std = (schedule.gather(n, idx, like=x) for n in ("coef_x", "coef_v", "std"))
    mean = step_mean(x, v, cx, cv)
    x_next = mean + std * torch.randn_like(x)
    dist = torch.distributions.Normal(mean, std.expand_as(mean))
    torch.testing.assert_close(log_prob(x_next, mean, std), dist.log_prob(x_next).flatten(1).sum(1))
    # the residual of the two policies' scores at x_next: coef_v (v - v_ref) / std^2
    mean_ref = step_mean(x, v_ref, cx, cv)
    expected = -(x_next - mean) / std**2 + (x_next - mean_ref) / std**2
    torch.testing.assert_close(score_residual(v, v_ref, cv, std).double(), expected, rtol=1e-4, atol=1e-4)


def test_scores_through_the_velocity_equal_autograd_and_the_analytic_jacobian():
    """grad_{x_i} log P(x_{i+1} | x_i) = J^T (x_{i+1} - mean) / std^2 with J = coef_x I + coef_v dv/dx (a linear
    "velocity model" v = x W, so J is known), as the pathwise reverse term of residual ∇-DB needs."""
    torch.manual_seed(4)
    schedule = flow_transition_schedule(FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), 8, 0.7)
    idx = torch.tensor([0, 5, 7])
    shape = (3, 2, 3, 3)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(18, 18, dtype=torch.float64) * 0.3
    v = (x.flatten(1) @ w).view(shape)
    cx, cv, std = (schedule.gather(n, idx, like=x) for n in ("coef_x", "coef_v", "std"))
    mean = step_mean(x, v, cx, cv)
    x_next = (mean + std * torch.randn(shape, dtype=torch.float64)).detach().requires_grad_(True)
    g_next, g_cur = torch.autograd.grad(log_prob(x_next, mean, std).sum(), [x_next, x], retain_graph=True)
    torch.testing.assert_close(score_next(x_next, mean, std), g_next)
    torch.testing.assert_close(score_current(x_next, mean, std, x), g_cur)
    r = ((x_next - mean) / std**2).detach().flatten(1)
    torch.testing.assert_close(g_cur.flatten(1), cx.flatten(1) * r + cv.flatten(1) * (r @ w.T))


def test_one_step_schedule():
    """K = 1 goes from sigma = 1 straight to 0: no second sigma, so g uses 1 - 0 at sigma = 1 (std = a)."""
    schedule = flow_transition_schedule(FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), 1, 0.5)
    torch.testing.assert_close(schedule.sigmas, torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(schedule.std, torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(schedule.coef_v, torch.tensor([-1.0], dtype=torch.float64))
    torch.testing.assert_close(schedule.coef_x, torch.tensor([1 - 0.5**2 / 2], dtype=torch.float64))


# ---------------------------------------------------------------- marginals: SDE vs data and ODE on the toy
def _sample(schedule, n, generator, wrong=False):
    x = torch.randn(n, dtype=torch.float64, generator=generator)
    for i in range(schedule.num_steps):
        sigma, sigma_next = float(schedule.sigmas[i]), float(schedule.sigmas[i + 1])
        v = _exact_velocity(x, sigma)
        # "wrong": the ODE's mean with the SDE's noise added, i.e. no score correction in the drift
        mean = x + (sigma_next - sigma) * v if wrong else schedule.coef_x[i] * x + schedule.coef_v[i] * v
        x = mean + schedule.std[i] * torch.randn(n, dtype=torch.float64, generator=generator)
    return x


def _errors(x):
    return abs(x.mean().item() - DATA_MEAN), abs(x.var().item() - DATA_VAR), abs((x < SPLIT).double().mean().item() - PI[0].item())


# Monte-Carlo standard errors at N = 40000: mean 0.008, variance ~0.02, weight 0.0023; the Euler bias at 50 SD3
# steps is ~0.09 in variance (ODE and SDE alike, measured), hence the tolerances below.
N, K = 40000, 50
TOL_MEAN, TOL_VAR, TOL_WEIGHT = 0.04, 0.16, 0.012


def test_ode_sampler_reaches_the_data_distribution():
    g = torch.Generator().manual_seed(10)
    schedule = flow_transition_schedule(FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), K, 0.0)
    err_mean, err_var, err_w = _errors(_sample(schedule, N, g))
    assert err_mean < TOL_MEAN and err_var < TOL_VAR and err_w < TOL_WEIGHT, (err_mean, err_var, err_w)


@pytest.mark.parametrize("noise_level", [0.3, 0.5, 0.7])
def test_sde_marginals_match_and_uncorrected_noise_does_not(noise_level):
    g = torch.Generator().manual_seed(11)
    schedule = flow_transition_schedule(FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), K, noise_level)
    err_mean, err_var, err_w = _errors(_sample(schedule, N, g))
    assert err_mean < TOL_MEAN and err_var < TOL_VAR and err_w < TOL_WEIGHT, (err_mean, err_var, err_w)
    # the same noise without the drift's score correction: the same check must fail, on every statistic
    wrong_mean, wrong_var, wrong_w = _errors(_sample(schedule, N, g, wrong=True))
    assert wrong_mean > TOL_MEAN and wrong_var > 2 * TOL_VAR and wrong_w > TOL_WEIGHT, (wrong_mean, wrong_var, wrong_w)


def test_noise_level_sets_how_much_the_sample_remembers_its_starting_noise():
    """ODE: x_0 is a function of x_1 (corr ~0.9 here); Flow-GRPO's 0.7 keeps some memory; sqrt(2), the time reversal
    of the forward noising SDE, forgets it (as DDPM does). Relevant to reward tilting, see docs/flow_matching.md."""
    corr = {}
    for a in (0.0, 0.7, MEMORYLESS_NOISE_LEVEL):
        schedule = flow_transition_schedule(FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), K, a)
        g = torch.Generator().manual_seed(12)
        x = x1 = torch.randn(N, dtype=torch.float64, generator=g)
        for i in range(K):
            v = _exact_velocity(x, float(schedule.sigmas[i]))
            x = schedule.coef_x[i] * x + schedule.coef_v[i] * v + schedule.std[i] * torch.randn(N, dtype=torch.float64, generator=g)
        corr[a] = torch.corrcoef(torch.stack([x1, x]))[0, 1].item()
    assert corr[0.0] > 0.8 and 0.1 < corr[0.7] < 0.4 and abs(corr[MEMORYLESS_NOISE_LEVEL]) < 0.03, corr


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_naming_the_argument():
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="noise_level"):
        flow_transition_schedule(scheduler, 10, noise_level=-0.1)
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_coefficients(0.5, 0.4, float("nan"))
    with pytest.raises(ValueError, match="num_steps"):
        flow_transition_schedule(scheduler, 0)
    with pytest.raises(ValueError, match="num_steps"):
        flow_transition_schedule(scheduler, 2.5)
    assert flow_transition_schedule(scheduler, torch.tensor(3)).num_steps == 3  # integer-like is fine
    with pytest.raises(ValueError, match="sigma must lie in"):
        velocity_to_x0(x, x, 1.5)
    with pytest.raises(ValueError, match="sigma must lie in"):
        velocity_to_epsilon(x, x, torch.tensor([-0.1]))
    with pytest.raises(ValueError, match="sigma_next must lie in"):
        flow_ode_step(x, x, 0.5, -0.2)
    with pytest.raises(ValueError, match="sigma_next must be <= sigma"):
        flow_sde_coefficients(0.3, 0.5, 0.7)
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_noise_scale(1.0, 0.7)
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        from diffusers import DDIMScheduler

        flow_transition_schedule(DDIMScheduler(), 10)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        flow_transition_schedule(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 10)
