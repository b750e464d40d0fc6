"""The digits benchmark's independent judges: accurate on real digits, not fooled where the reward's classifier is,
and the target as a judge sees it is the SNIS formula with the judge's classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trl_gfn.assets import BUNDLED_DIGIT_CLASSIFIER, BUNDLED_DIGIT_JUDGE
from trl_gfn.data.uci_digits import load_digit_images
from trl_gfn.evaluation.judges import PixelNearestNeighbours, judged_target_histogram, load_digit_judges
from trl_gfn.rewards.digits import DigitClassifier, DigitClassifierReward


@pytest.fixture(scope="module")
def digits():
    return load_digit_images(seed=0)


def test_judges_classify_held_out_digits(digits):
    _, _, x_test, y_test = digits
    judges = load_digit_judges()
    assert set(judges) == {"judge_cnn", "pixel_knn"}
    accuracy = {name: float((judge(x_test) == y_test).float().mean()) for name, judge in judges.items()}
    # measured: 1.0 (the CNN, also on its own held-out split) and 0.975 (k = 5 pixel neighbours)
    assert accuracy["judge_cnn"] >= 0.98 and accuracy["pixel_knn"] >= 0.95, accuracy


def test_judge_cnn_is_another_network_than_the_reward():
    judge, reward = DigitClassifier.from_pretrained(BUNDLED_DIGIT_JUDGE), DigitClassifier.from_pretrained(BUNDLED_DIGIT_CLASSIFIER)
    assert judge.feature_dim != reward.feature_dim  # another width: no weights shared with the reward


def test_pixel_knn_agrees_with_scikit_learn(digits):
    from sklearn.neighbors import KNeighborsClassifier

    x_train, y_train, x_test, _ = digits
    ours = PixelNearestNeighbours(x_train, y_train, k=5)(x_test).numpy()
    flat = lambda x: x.mean(1).flatten(1).numpy()  # noqa: E731
    theirs = KNeighborsClassifier(5).fit(flat(x_train), y_train.numpy()).predict(flat(x_test))
    # the two differ only in how a tied vote is broken (nearest neighbour's class here, smallest class there)
    assert (ours == theirs).mean() >= 0.99


def test_pixel_knn_tie_goes_to_the_nearest_neighbour():
    points = torch.tensor([0.0, 1.0, 3.0, 4.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1)
    labels = torch.tensor([7, 2, 2, 7])
    knn = PixelNearestNeighbours(points, labels, k=4)  # 2 votes each: the nearest decides
    query = torch.tensor([0.9, 3.2]).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    assert knn(query).tolist() == [2, 2]
    assert PixelNearestNeighbours(points, labels, k=1)(query).tolist() == [2, 2]
    assert knn(torch.tensor([-1.0]).view(1, 1, 1, 1).expand(1, 3, 1, 1)).tolist() == [7]


def test_pixel_knn_rejects_bad_inputs():
    x, y = torch.zeros(4, 3, 2, 2), torch.arange(4)
    with pytest.raises(ValueError, match="k must be"):
        PixelNearestNeighbours(x, y, k=0)
    with pytest.raises(ValueError, match="at least k"):
        PixelNearestNeighbours(x, y, k=5)
    with pytest.raises(ValueError, match="labels"):
        PixelNearestNeighbours(x, y[:3])
    with pytest.raises(ValueError, match="fitted on"):
        PixelNearestNeighbours(x, y, k=1)(torch.zeros(1, 3, 4, 4))


def test_judges_are_not_fooled_where_the_reward_classifier_is(digits):
    """Held-out digits outside S = {0, 8}, pushed by signed reward-gradient steps (|δ| ≤ 0.1 per pixel): the reward's
    classifier then puts most of them on S, the judges few (measured: 0.75 against 0.27 and 0.0)."""
    _, _, x_test, y_test = digits
    reward = DigitClassifierReward.from_pretrained(BUNDLED_DIGIT_CLASSIFIER, target_digits=[0, 8])
    x = x_test[(y_test != 0) & (y_test != 8)][:64]
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(40):
        r = reward((x + delta).clamp(0, 1), [""] * len(x), [{}] * len(x))[0]
        (g,) = torch.autograd.grad(r.sum(), delta)
        with torch.no_grad():
            delta += 0.01 * g.sign()
            delta.clamp_(-0.1, 0.1)
    hacked = (x + delta).clamp(0, 1).detach()

    def on_s(classes):
        return float(((classes == 0) | (classes == 8)).float().mean())

    with torch.no_grad():
        fooled = on_s(reward.logits(hacked).argmax(-1))
    judged = {name: on_s(judge(hacked)) for name, judge in load_digit_judges().items()}
    assert fooled >= 0.5 and max(judged.values()) <= 0.45 and judged["pixel_knn"] <= 0.1, (fooled, judged)


def test_judged_target_histogram_is_snis_with_the_judges_classes():
    rng = np.random.default_rng(0)
    rewards = rng.normal(-2, 1, 500)
    classes = rng.integers(0, 10, 500)
    beta = 3.0
    w = np.exp(beta * (rewards - rewards.max()))
    expected = np.bincount(classes, weights=w, minlength=10) / w.sum()
    np.testing.assert_allclose(judged_target_histogram(classes, rewards, beta), expected, rtol=1e-12)
    np.testing.assert_allclose(judged_target_histogram(torch.as_tensor(classes), rewards, 0.0), np.bincount(classes, minlength=10) / 500)


def test_loading_the_judges_leaves_the_global_random_stream_alone():
    load_digit_judges.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_digit_judges()
    assert torch.equal(torch.rand(3), expected)
