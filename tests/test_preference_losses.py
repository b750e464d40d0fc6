"""Each preference loss equals an independent float64 computation of its formula on the same tensors; the limits that
reduce to Diffusion-DPO do; the pieces (Adaptive-DPO metric and weight, SDPO rescale, soft labels) behave as specified."""

import math

import numpy as np
import pytest
import torch

from trl_gfn.losses import preference as L

BETA = 1500.0


def _errors(n=64, seed=0, spread=2e-3):
    g = torch.Generator().manual_seed(seed)
    base = 0.05 + 0.02 * torch.rand(n, generator=g, dtype=torch.float64)
    return L.PairErrors(policy_w=base + spread * torch.randn(n, generator=g, dtype=torch.float64),
                        policy_l=base + 0.01 + spread * torch.randn(n, generator=g, dtype=torch.float64),
                        ref_w=base + spread * torch.randn(n, generator=g, dtype=torch.float64),
                        ref_l=base + 0.01 + spread * torch.randn(n, generator=g, dtype=torch.float64))


def _np(e):
    return [t.numpy() for t in (e.policy_w, e.policy_l, e.ref_w, e.ref_l)]


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_dpo_logit_and_sigmoid_loss_match_the_salesforce_form():
    e = _errors()
    pw, pl, rw, rl = _np(e)
    # Salesforce's DiffusionDPO: inside = -0.5 * beta * (model_diff - ref_diff); loss = -logsigmoid(inside)
    inside = -0.5 * BETA * ((pw - pl) - (rw - rl))
    u = L.dpo_logit(e, BETA)
    np.testing.assert_allclose(u.numpy(), inside, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(L.sigmoid_loss(u).numpy(), -_log_sigmoid(inside), rtol=1e-12)
    # diffusers' research example writes the same loss as -logsigmoid(beta_diffusers * (ref_diff - model_diff)) with beta_diffusers = beta / 2
    np.testing.assert_allclose(L.sigmoid_loss(u).numpy(), -_log_sigmoid((BETA / 2) * ((rw - rl) - (pw - pl))), rtol=1e-12)
    assert np.abs(inside).max() > 0.5  # the test tensors give non-trivial logits


def test_pixel_mean_is_taken_inside_the_sigmoid():
    """diffusers issue #6702: averaging the loss over pixels is not the loss of the pixel-averaged errors."""
    g = torch.Generator().manual_seed(1)
    sq = [0.05 + 0.02 * torch.rand(8, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    per_pair = L.PairErrors(*(s.mean(dim=(1, 2, 3)) for s in sq))
    ours = L.sigmoid_loss(L.dpo_logit(per_pair, BETA)).mean()
    per_pixel = L.sigmoid_loss(-0.5 * BETA * ((sq[0] - sq[2]) - (sq[1] - sq[3]))).mean()
    expected = np.mean(-_log_sigmoid(-0.5 * BETA * ((sq[0] - sq[2]) - (sq[1] - sq[3])).mean(dim=(1, 2, 3)).numpy()))
    assert ours.item() == pytest.approx(expected, rel=1e-12)
    assert abs(ours.item() - per_pixel.item()) > 1e-3


def test_hinge_and_ipo_match_their_formulas():
    e = _errors(seed=2)
    pw, pl, rw, rl = _np(e)
    h = -0.5 * ((pw - rw) - (pl - rl))  # the ELBO log-ratio margin; u = beta * h
    u = L.dpo_logit(e, BETA)
    np.testing.assert_allclose(L.hinge_loss(u).numpy(), np.maximum(0.0, 1.0 - BETA * h), rtol=1e-12, atol=1e-15)
    # IPO (Azar et al. Eq. 17) with tau = beta: (h - 1/(2 beta))^2, scaled by beta^2
    np.testing.assert_allclose(L.ipo_loss(u).numpy(), BETA**2 * (h - 1.0 / (2 * BETA)) ** 2, rtol=1e-9)
    assert (BETA * h > 1).any() and (BETA * h < 1).any()  # both sides of the hinge
    v = torch.tensor([0.5], requires_grad=True)
    (g,) = torch.autograd.grad(L.ipo_loss(v).sum(), v)
    assert g.item() == 0.0  # IPO's target margin: u = 1/2


def _dmpo_reference(u, alpha):
    """KL(Bern(p) || Bern(q)) with p = sigmoid(u), q = 1 - alpha, from its definition in float64."""
    p = 1.0 / (1.0 + np.exp(-u))
    q = 1.0 - alpha
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def test_dmpo_is_the_reverse_bernoulli_kl_computed_stably():
    u = torch.linspace(-30, 30, 121, dtype=torch.float64)
    for alpha in (0.01, 0.1, 0.3):
        np.testing.assert_allclose(L.dmpo_loss(u, alpha).numpy(), _dmpo_reference(u.numpy(), alpha), rtol=1e-9, atol=1e-12)
    extreme = L.dmpo_loss(torch.tensor([-1e4, -500.0, 500.0, 1e4]), 0.01)  # float32, far beyond exp's range
    assert torch.isfinite(extreme).all()
    assert extreme[0].item() == pytest.approx(-math.log(0.01), rel=1e-6)  # sigma(u) -> 0: KL -> -log alpha
    assert extreme[-1].item() == pytest.approx(-math.log1p(-0.01), rel=1e-5)  # sigma(u) -> 1: KL -> -log(1 - alpha)


def test_dmpo_minimum_gradient_and_limits():
    alpha = 0.01
    star = math.log((1 - alpha) / alpha)
    u = torch.tensor([star, -3.0, 0.0, 2.0, 9.0], dtype=torch.float64, requires_grad=True)
    loss = L.dmpo_loss(u, alpha)
    (grad,) = torch.autograd.grad(loss.sum(), u)
    s = torch.sigmoid(u.detach())
    torch.testing.assert_close(grad, s * (1 - s) * (u.detach() - star), rtol=1e-9, atol=1e-12)
    assert loss[0].item() == pytest.approx(0.0, abs=1e-12)
    # alpha -> 0: the reverse KL / log(1/alpha) tends to sigma(-u) (not to DPO's -log sigma(u): the limit keeps it bounded)
    v = torch.tensor([-4.0, -1.0, 0.0, 1.0, 4.0], dtype=torch.float64)
    gaps = [(L.dmpo_loss(v, a) / math.log(1 / a) - torch.sigmoid(-v)).abs().max().item() for a in (1e-4, 1e-20, 1e-200)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.002
    # Diffusion-DPO is the *forward* KL(Bernoulli(1 - alpha) || Bernoulli(sigma(u))) at alpha = 0: -log sigma(u)
    p = torch.sigmoid(v)
    forward_at_0 = 1.0 * (math.log(1.0) - torch.log(p))
    torch.testing.assert_close(forward_at_0, L.sigmoid_loss(v), rtol=1e-12, atol=1e-12)


def test_see_dpo_reduces_to_dpo_at_gamma_0_and_matches_its_derivation():
    e = _errors(seed=3)
    assert torch.equal(L.see_logit(e, BETA, 0.0), L.dpo_logit(e, BETA))
    pw, pl, rw, rl = _np(e)
    lw, ll, lrw, lrl = -pw / 2, -pl / 2, -rw / 2, -rl / 2  # log-likelihood proxies
    for gamma in (300.0, 1500.0):
        # implicit reward r = (beta + gamma) log pi_theta - beta log pi_ref (entropy-regularised optimum)
        logit = (BETA + gamma) * (lw - ll) - BETA * (lrw - lrl)
        ours = L.sigmoid_loss(L.see_logit(e, BETA, gamma))
        np.testing.assert_allclose(ours.numpy(), -_log_sigmoid(logit), rtol=1e-9)
        assert not np.allclose(ours.numpy(), L.sigmoid_loss(L.dpo_logit(e, BETA)).numpy())


def test_adaptive_metric_weight_and_margin_match_their_formulas():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 32, generator=g, dtype=torch.float64) * 0.3
    rho, T, c = 15.0, 10.0, 1.0
    m = L.adaptive_metric(logits, rho)
    z = rho * logits.numpy()
    conf = np.abs(np.mean(1 / (1 + np.exp(-z)), axis=0) - 1.0)
    stab = np.minimum(np.std(z, axis=0, ddof=1), 1.0)
    np.testing.assert_allclose(m.numpy(), conf * stab, rtol=1e-12)
    assert (stab == 1.0).any() and (stab < 1.0).any()  # the clamp is exercised
    u = logits[0].clone().requires_grad_(True)
    for margin, power in (("linear", 1), ("quadratic", 2)):
        loss, weight = L.adaptive_loss(u, m, T, c, margin)
        w = 1.0 / (T * m.numpy() + c)
        np.testing.assert_allclose(weight.numpy(), w, rtol=1e-12)
        np.testing.assert_allclose(loss.detach().numpy(), -w * _log_sigmoid(u.detach().numpy() + m.numpy() ** power), rtol=1e-10)
    # the metric and weight are constants of the step: the gradient is w * d(-log sigma(u + delta))/du only
    metric = m.clone().requires_grad_(True)
    loss, _ = L.adaptive_loss(u, metric, T, c, "quadratic")
    loss.sum().backward()
    assert metric.grad is None
    # at m = 0 (e.g. every pair at the start, all models equal) it is Diffusion-DPO divided by the intercept
    zero = torch.zeros(32, dtype=torch.float64)
    torch.testing.assert_close(L.adaptive_loss(u.detach(), zero, T, 2.0, "quadratic")[0], L.sigmoid_loss(u.detach()) / 2.0)
    assert L.adaptive_metric(torch.zeros(3, 5), rho).abs().max() == 0


def test_winner_preserving_scale_keeps_the_winner_error_from_rising():
    g = torch.Generator().manual_seed(5)
    gw = torch.randn(16, 4, 3, 3, generator=g, dtype=torch.float64)
    gl = 0.8 * gw + 0.6 * torch.randn(16, 4, 3, 3, generator=g, dtype=torch.float64)
    gl[:4] = -gl[:4]  # opposed gradients: no rescale needed
    mu = 0.9
    lam = L.winner_preserving_scale(gw, gl, mu)
    a, b = gw.flatten(1).numpy(), gl.flatten(1).numpy()
    dot, nw = (a * b).sum(1), (a * a).sum(1)
    expected = np.where(dot > 0, np.clip((1 - mu) * nw / np.where(dot > 0, dot, 1), 0, 1), 1.0)
    np.testing.assert_allclose(lam.numpy(), expected, rtol=1e-12)
    assert (lam[:4] == 1).all() and (lam[4:] < 1).all()
    # first-order change of the winner's error along the safeguarded update, in output space: <= -mu |g_w|^2
    change = ((-a + lam.numpy()[:, None] * b) * a).sum(1)
    assert (change <= -mu * nw + 1e-9).all()
    # without the rescale some of them would be (the test is not vacuous)
    assert (((-a + b) * a).sum(1) > -mu * nw).any()


def test_scale_gradient_keeps_the_value_and_scales_the_gradient():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x**2
    scale = torch.tensor([1.0, 0.5, 0.0])
    z = L.scale_gradient(y, scale)
    assert torch.equal(z.detach(), y.detach())
    (grad,) = torch.autograd.grad(z.sum(), x)
    assert torch.equal(grad, 2 * x.detach() * scale)


def test_soft_labels_and_ties():
    u = torch.linspace(-3, 3, 13, dtype=torch.float64, requires_grad=True)
    hard = torch.ones(13, dtype=torch.float64)
    assert torch.equal(L.soft_label_loss(L.sigmoid_loss, u, hard), L.sigmoid_loss(u))
    p = torch.full((13,), 0.7, dtype=torch.float64)
    np.testing.assert_allclose(L.soft_label_loss(L.sigmoid_loss, u, p).detach().numpy(),
                               -(0.7 * _log_sigmoid(u.detach().numpy()) + 0.3 * _log_sigmoid(-u.detach().numpy())), rtol=1e-12)
    # a tie pulls u to 0 (the reference's judgement) for every loss that is defined on both orientations
    tie = torch.full((1,), 0.5, dtype=torch.float64)
    for fn in (L.sigmoid_loss, L.ipo_loss, lambda v: L.dmpo_loss(v, 0.01)):
        v = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(L.soft_label_loss(fn, v, tie).sum(), v)
        assert abs(grad.item()) < 1e-12


def test_implicit_accuracy_counts_ties_as_half():
    assert L.implicit_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])).item() == pytest.approx(0.625)
