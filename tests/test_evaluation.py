"""Metrics of trl_gfn.evaluation on cases with known answers."""

import math
import warnings

import numpy as np
import pytest
import torch

from trl_gfn.evaluation import (
    TargetHistogram,
    class_histogram,
    distribution_matching,
    evaluate_samples,
    exact_target_histogram,
    frechet_distance,
    frechet_distance_from_stats,
    histogram_entropy,
    ideal_target_histogram,
    pairwise_diversity,
    reward_stats,
    total_variation,
    tv_noise_floor,
)


def test_reward_stats():
    s = reward_stats(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s["sem"] == pytest.approx(s["std"] / 2)
    assert (s["min"], s["max"], s["n"]) == (1.0, 4.0, 4)


def test_pairwise_diversity_known():
    f = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    # pairs: (0,1)=5, (0,2)=0, (1,2)=5
    assert pairwise_diversity(f) == pytest.approx(10 / 3)
    assert pairwise_diversity(np.ones((5, 3))) == pytest.approx(0.0, abs=1e-6)
    assert pairwise_diversity(np.array([[1.0, 0.0], [0.0, 1.0]]), metric="cosine") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pairwise_diversity(np.ones((1, 3)))


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # rank-deficient covariance (fewer samples than dims): still finite and ~0 for identical sets
    b = rng.normal(size=(10, 32))
    assert frechet_distance(b, b) == pytest.approx(0.0, abs=1e-6)


def test_frechet_known_gaussians():
    # closed form for commuting covariances: |dmu|^2 + sum (sqrt(s_a) - sqrt(s_b))^2
    mu_a, mu_b = np.zeros(3), np.array([1.0, 2.0, 0.0])
    sa, sb = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    expected = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance_from_stats(mu_a, sa, mu_b, sb) == pytest.approx(expected, rel=1e-10)
    # non-commuting case against the general formula tr(S_a + S_b - 2 (S_a S_b)^1/2) via scipy
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    ca, cb = A @ A.T + 0.1 * np.eye(4), B @ B.T + 0.1 * np.eye(4)
    ref = np.trace(ca + cb - 2 * scipy_linalg.sqrtm(ca @ cb).real)
    assert frechet_distance_from_stats(np.zeros(4), ca, np.zeros(4), cb) == pytest.approx(ref, rel=1e-8)


def test_frechet_from_samples_close_to_population():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal(0.0, 2.0, size=(20000, 2)) + np.array([3.0, 0.0])
    # population: 9 + 2 * (2 - 1)^2 = 11
    assert frechet_distance(a, b) == pytest.approx(11.0, rel=0.03)


def test_histogram_entropy_tv():
    h = class_histogram(torch.tensor([0, 1, 1, 3]), num_classes=4)
    np.testing.assert_allclose(h, [0.25, 0.5, 0.0, 0.25])
    logits = torch.eye(4)[[0, 1, 1, 3]] * 5
    np.testing.assert_allclose(class_histogram(logits, 4), h)
    assert histogram_entropy(np.ones(10)) == pytest.approx(math.log(10))
    assert histogram_entropy([1, 0, 0]) == pytest.approx(0.0)
    assert total_variation(h, h) == 0.0
    assert total_variation([1, 0], [0, 1]) == pytest.approx(1.0)
    assert total_variation([0.5, 0.5], [0.75, 0.25]) == pytest.approx(0.25)


def test_snis_beta_zero_is_plain_histogram():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 500)
    r = rng.normal(size=500)
    t = ideal_target_histogram(y, r, beta=0.0)
    np.testing.assert_allclose(t.hist, class_histogram(y, 10))
    assert t.ess == pytest.approx(500)
    # delta-method error at beta=0 is the multinomial error sqrt(p(1-p)/N)
    np.testing.assert_allclose(t.stderr, np.sqrt(t.hist * (1 - t.hist) / 500), rtol=1e-10)


def test_snis_reward_function_of_class_is_exact():
    # reward depends on the class only -> SNIS reproduces p(c) exp(beta r_c) / Z of the empirical class mix exactly
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    r_c = np.log([0.9, 0.1, 0.5, 0.01])
    t = ideal_target_histogram(y, r_c[y], beta=2.0, num_classes=4, min_ess=0)
    expected = exact_target_histogram(np.array([0.1, 0.2, 0.3, 0.4]), 2.0 * r_c)
    np.testing.assert_allclose(t.hist, expected, rtol=1e-12)


def test_snis_against_exact_target_monte_carlo():
    # base: class c with prob p_c; within class c the reward is r = log(u), u ~ Beta(a_c, 1), so
    # E[exp(beta r) | c] = E[u^beta] = a_c / (a_c + beta) exactly.
    rng = np.random.default_rng(4)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    a = np.array([5.0, 0.5, 2.0, 1.0])
    beta, n = 1.5, 20000
    y = rng.choice(4, size=n, p=p)
    r = np.log(rng.beta(a[y], 1.0))
    exact = exact_target_histogram(p, np.log(a / (a + beta)))
    t = ideal_target_histogram(y, r, beta=beta, num_classes=4, n_bootstrap=200, seed=0)
    z = (t.hist - exact) / t.stderr
    assert np.all(np.abs(z) < 4.5), z
    # the delta-method and bootstrap errors agree
    np.testing.assert_allclose(t.stderr, t.bootstrap_stderr, rtol=0.3)
    assert 0 < t.ess < n


def test_snis_stderr_is_calibrated():
    # repeat the estimate on independent base samples: the spread matches the reported error
    p = np.array([0.5, 0.3, 0.2])
    a = np.array([1.0, 3.0, 0.3])
    beta, n = 2.0, 2000
    rng = np.random.default_rng(5)
    est, se = [], []
    for _ in range(300):
        y = rng.choice(3, size=n, p=p)
        r = np.log(rng.beta(a[y], 1.0))
        t = ideal_target_histogram(y, r, beta=beta, num_classes=3)
        est.append(t.hist)
        se.append(t.stderr)
    ratio = np.std(est, axis=0) / np.mean(se, axis=0)
    assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio


def test_snis_warns_on_degenerate_weights():
    y = np.arange(200) % 10
    r = np.linspace(-10, 0, 200)
    with pytest.warns(RuntimeWarning, match="effective sample size"):
        t = ideal_target_histogram(y, r, beta=100.0, min_ess=20)
    assert t.ess < 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ideal_target_histogram(y, r, beta=0.01, min_ess=20)


def test_distribution_matching_and_noise_floor():
    rng = np.random.default_rng(6)
    n_base = 5000
    y_base = rng.integers(0, 10, n_base)
    r_base = np.where(np.isin(y_base, [0, 8]), 0.0, -2.0)
    t = ideal_target_histogram(y_base, r_base, beta=1.0)
    # an exact sampler of the target reads about the noise floor
    y_ft = rng.choice(10, size=1000, p=t.hist)
    dm = distribution_matching(y_ft, t, y_base, r_base, n_bootstrap=100)
    assert abs(dm["tv"] - dm["tv_noise_floor"]) < 4 * max(dm["tv_stderr"], dm["tv_noise_floor_std"])
    # a collapsed sampler (all zeros) is far off
    dm2 = distribution_matching(np.zeros(1000, dtype=int), t, n_bootstrap=50)
    assert dm2["tv"] > 0.4 and dm2["tv"] > dm2["tv_noise_floor"] + 10 * dm2["tv_stderr"]
    # noise floor ~ sqrt(C / (2 pi M)) for equiprobable classes (large-M normal approximation)
    m, _ = tv_noise_floor(np.ones(10), 10000)
    assert m == pytest.approx(0.5 * 10 * math.sqrt(0.1 * 0.9 / 10000) * math.sqrt(2 / math.pi), rel=0.05)


def test_evaluate_samples_with_toy_classifier():
    class Toy(torch.nn.Module):
        def features(self, x):
            return x.mean(dim=(2, 3))

        def logits(self, x):
            return self.features(x)

    images = torch.rand(16, 3, 8, 8)
    reward = lambda im, p, m: (im.mean(dim=(1, 2, 3)), {})  # noqa: E731
    out = evaluate_samples(images, Toy(), reward, base_features=torch.rand(20, 3), target_histogram=np.ones(3) / 3, num_classes=3)
    for k in ["reward_mean", "reward_std", "diversity", "class_histogram", "class_entropy", "fd_to_base", "tv_to_target", "tv_noise_floor"]:
        assert k in out and np.all(np.isfinite(out[k])), k
    assert sum(out["class_histogram"]) == pytest.approx(1.0)
    assert out["reward_mean"] == pytest.approx(images.mean().item(), rel=1e-5)
    assert isinstance(ideal_target_histogram(np.zeros(3, int), np.zeros(3), 0.0, min_ess=0), TargetHistogram)


def test_target_features_of_a_two_group_tilt():
    """r = 0 on group A, -10 on group B: at β = 5 the target is group A (weights e^-50 on B), at β = 0 the base sample."""
    from trl_gfn.evaluation import frechet_distance, pairwise_diversity, target_features

    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(400, 3))
    b = rng.normal(6.0, 2.0, size=(400, 3))
    feats = np.concatenate([a, b])[rng.permutation(800)]
    is_a = (np.abs(feats - 0.0).sum(1) < np.abs(feats - 6.0).sum(1))
    rewards = np.where(is_a, 0.0, -10.0)
    tilted = target_features(feats, rewards, beta=5.0, eval_size=64)
    np.testing.assert_allclose(tilted.mean, feats[is_a].mean(0), atol=1e-9)
    np.testing.assert_allclose(tilted.cov, np.cov(feats[is_a], rowvar=False), rtol=1e-9)
    assert abs(tilted.diversity - pairwise_diversity(feats[is_a])) < 0.1 * pairwise_diversity(feats[is_a])
    assert tilted.fd(feats[is_a][:64]) < 3 * tilted.fd_floor + 0.5 < tilted.fd(feats[~is_a][:64])  # group A reads near the floor
    plain = target_features(feats, rewards, beta=0.0, eval_size=64)
    np.testing.assert_allclose(plain.cov, np.cov(feats, rowvar=False), rtol=1e-9)  # uniform weights: the unbiased covariance
    assert plain.fd(feats) < 1e-9 and frechet_distance(feats[:400], feats[400:]) < plain.fd(feats[~is_a])
