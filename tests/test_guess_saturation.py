"""The saturating γ of the flow-gradient guess (reward_gradient_scaling="saturating").

It is the factor by which smoothing β·r over a Gaussian posterior of x_0 shrinks the gradient at x̂_0 when the log-reward
has curvature c = 1/β_c; checked against a quadrature of log E[exp(β r)] under that posterior.
"""

import math
import warnings

import pytest
import torch

from trl_gfn import NablaGFlowNetConfig
from trl_gfn.diffusion.noise_level import NoiseLevel


def _smoothed_log_reward_slope(mean: float, var: float, beta: float, curvature: float, centre: float = 0.7) -> float:
    """d/dm log ∫ N(x; m, var) exp(β r(x)) dx for r(x) = −c (x − centre)²/2, by quadrature and central differences."""
    x = torch.linspace(-30, 30, 600001, dtype=torch.float64)

    def log_value(m):
        log_density = -(x - m) ** 2 / (2 * var) - beta * curvature * (x - centre) ** 2 / 2
        return torch.logsumexp(log_density, 0).item()

    h = 1e-4
    return (log_value(mean + h) - log_value(mean - h)) / (2 * h)


@pytest.mark.parametrize("alpha_bar", [0.02, 0.3, 0.9])
@pytest.mark.parametrize("beta", [3.0, 30.0, 300.0])
def test_saturating_gamma_is_the_posterior_smoothing_factor_of_a_quadratic_log_reward(alpha_bar, beta):
    beta_c = 30.0
    level = NoiseLevel.from_alpha_bar(torch.tensor([alpha_bar], dtype=torch.float64))
    gamma = level.gamma("saturating", beta / beta_c).item()
    mean, curvature = 0.2, 1 / beta_c
    var = (1 - alpha_bar) / alpha_bar  # the width of x_0 | x_k given x_k = sqrt(ᾱ) x_0 + sqrt(1 − ᾱ) ε
    exact = _smoothed_log_reward_slope(mean, var, beta, curvature)
    grad_r = -curvature * (mean - 0.7)
    assert math.isclose(beta * gamma * grad_r, exact, rel_tol=1e-5)


def test_saturating_gamma_equals_squared_at_its_reward_scale_and_saturates_in_beta():
    a = torch.linspace(0.005, 0.999, 200)
    level = NoiseLevel.from_alpha_bar(a)
    assert torch.equal(level.gamma("saturating", 1.0), level.gamma("squared"))
    # at the noisiest level β·γ approaches ᾱ/(c(1 − ᾱ)) whatever β: it changes by less than 2 % from β = 300 to 3000
    noisy = NoiseLevel.from_alpha_bar(torch.tensor([0.001]))
    bg = [beta * noisy.gamma("saturating", beta / 30.0).item() for beta in (300.0, 3000.0)]
    assert abs(bg[1] / bg[0] - 1) < 0.02
    # ... while the squared guess grows tenfold
    assert (3000.0 * noisy.gamma("squared")).item() == pytest.approx(10 * 300.0 * noisy.gamma("squared").item())
    # the clean sample keeps the exact β∇r: γ = 1 at signal 1, noise 0
    clean = NoiseLevel(torch.ones(1), torch.zeros(1))
    assert clean.gamma("saturating", 7.0).item() == 1.0


def test_saturating_gamma_on_a_flow_uses_the_vp_equivalent_level():
    sigma = torch.tensor([0.1, 0.5, 0.95])
    level = NoiseLevel(1 - sigma, sigma, "velocity")
    s2, n2 = (1 - sigma) ** 2, sigma**2
    torch.testing.assert_close(level.gamma("saturating", 4.0), s2 / (s2 + 4.0 * n2))
    torch.testing.assert_close(level.gamma("saturating", 1.0), level.alpha_bar)


def test_gamma_rejects_unknown_scalings_and_negative_saturation():
    level = NoiseLevel.from_alpha_bar(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="reward_gradient_scaling"):
        level.gamma("cube")
    with pytest.raises(ValueError, match="saturation"):
        level.gamma("saturating", -1.0)


def test_config_requires_the_saturation_reward_scale_and_warns_when_it_is_unused():
    with pytest.raises(ValueError, match="reward_gradient_saturation_reward_scale"):
        NablaGFlowNetConfig(reward_gradient_scaling="saturating")
    with pytest.raises(ValueError, match="reward_gradient_saturation_reward_scale"):
        NablaGFlowNetConfig(reward_gradient_scaling="saturating", reward_gradient_saturation_reward_scale=0.0)
    with pytest.warns(UserWarning, match="reward_gradient_saturation_reward_scale has no effect"):
        NablaGFlowNetConfig(reward_gradient_saturation_reward_scale=30.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NablaGFlowNetConfig(reward_gradient_scaling="saturating", reward_gradient_saturation_reward_scale=30.0)
