"""The simulated-annotator preference data of the bundled digits model: labels follow the annotators' rules, generation is
deterministic, the shipped files are what the script writes, and Diffusion-DPO on them moves the model towards round digits."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from trl_gfn.assets import BUNDLED_DIGITS_PREFERENCES
from trl_gfn.data.digits_preferences import (AnnotatorPool, describe, generate_digits_preferences, label_pairs, load_digits_preferences,
                                             relabel)
from trl_gfn.evaluation import win_rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _utilities(n=400, seed=0):
    rng = np.random.default_rng(seed)
    round_ = rng.random((n, 2)) < 0.4
    u = np.where(round_, rng.uniform(0.9, 1.0, (n, 2)), rng.uniform(0.0, 0.1, (n, 2)))
    return u[:, 0], u[:, 1]


def test_labels_follow_the_annotator_rules():
    u0, u1 = _utilities()
    ties = np.abs(u0 - u1) < 0.1
    non_tie = ~ties
    labels = {}
    for f in (0.0, 0.2, 0.3):
        pool = AnnotatorPool(minority_fraction=f, num_annotators=20)
        out = label_pairs(u0, u1, pool, seed=3)
        assert out == label_pairs(u0, u1, pool, seed=3)  # deterministic
        label, minority, user = (np.asarray(out[k]) for k in ("label_0", "minority", "user_id"))
        assert (label[ties] == 0.5).all() and set(label[non_tie]) <= {0.0, 1.0}
        assert (minority & non_tie).sum() == round(f * non_tie.sum())  # exactly the requested share of the non-tie labels
        majority_side = (u0 > u1)[non_tie]
        agree = (label[non_tie] == 1.0) == majority_side
        # cross-group pairs (|dU| >= 0.8) are labelled deterministically: against the majority exactly when a minority annotator labelled them
        assert (agree == ~minority[non_tie]).all()
        n_min = pool.num_minority_annotators
        assert (user[minority] >= 20 - n_min).all() and (user[~minority] < 20 - n_min).all()
        labels[f] = (label, minority)
    assert (labels[0.2][1] <= labels[0.3][1]).all()  # nested minority sets: 20 % of them are among the 30 %
    changed = labels[0.0][0] != labels[0.3][0]
    assert (changed == (labels[0.3][1] & non_tie)).all()  # only the minority pairs' labels differ
    # Bradley-Terry noise on close pairs: with dU = 0.15, kappa = 10 the preferred side wins sigmoid(1.5) = 82 % of the time
    close = label_pairs(np.full(4000, 0.6), np.full(4000, 0.45), AnnotatorPool(minority_fraction=0.0), seed=0)["label_0"]
    assert np.mean(close) == pytest.approx(1 / (1 + np.exp(-1.5)), abs=0.02)


def test_generation_is_deterministic_and_independent_of_the_batch_size():
    a = generate_digits_preferences(5, 3, num_steps=4, batch_size=6)
    b = generate_digits_preferences(5, 3, num_steps=4, batch_size=2)
    assert a.column_names == ["caption", "jpg_0", "jpg_1", "label_0", "user_id", "pair_id", "minority", "utility_0", "utility_1", "digit_0",
                              "digit_1", "label_seed"]
    assert a["pair_id"] == [5, 6, 7] and a["caption"] == ["a handwritten digit"] * 3
    for col in ("jpg_0", "jpg_1"):
        for x, y in zip(a[col], b[col]):
            diff = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
            assert diff.max() <= 1  # float rounding of another batch size moves a pixel by at most one level
    np.testing.assert_allclose(a["utility_0"], b["utility_0"], atol=1e-3)
    assert a["label_0"] == b["label_0"] and a["user_id"] == b["user_id"]


def test_shipped_data_is_what_the_script_writes():
    shipped = load_digits_preferences("train")
    assert len(shipped) == 2000 and len(load_digits_preferences("validation")) == 200
    again = generate_digits_preferences(0, 4)  # the first pairs, with the script's defaults
    for col in ("jpg_0", "jpg_1"):
        for x, y in zip(shipped.select(range(4))[col], again[col]):
            assert np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() <= 1
    np.testing.assert_allclose(shipped["utility_0"][:4], again["utility_0"], atol=1e-3)
    stats = describe(shipped)
    assert stats["minority_share_of_non_ties"] == pytest.approx(0.1, abs=0.001)
    assert 0.3 < stats["round_share"] < 0.5 and 0.3 < stats["ties"] / stats["pairs"] < 0.5
    relabelled = relabel(shipped, AnnotatorPool(minority_fraction=0.3))
    assert describe(relabelled)["minority_share_of_non_ties"] == pytest.approx(0.3, abs=0.001)
    assert relabelled["jpg_0"][0] == shipped["jpg_0"][0]


def test_script_writes_a_small_dataset(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.path.join(ROOT, "src"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_digits_preferences.py"), "--output_dir", str(tmp_path),
                             "--train_pairs", "3", "--validation_pairs", "2", "--num_steps", "3", "--minority_fraction", "0.2"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    train = load_digits_preferences("train", path=str(tmp_path))
    validation = load_digits_preferences("validation", path=str(tmp_path))
    assert len(train) == 3 and validation["pair_id"] == [3, 4]
    assert os.path.isfile(tmp_path / "summary.json")


def test_dpo_on_the_shipped_pairs_moves_the_model_towards_round_digits(tmp_path):
    """Diffusion-DPO (default beta) on 600 shipped pairs, 2 epochs: samples from the same noises win against the base model."""
    from trl_gfn import DiffusionDPOConfig, DiffusionDPOTrainer
    from trl_gfn.data.digits_preferences import load_classifier, load_pipeline, round_utility
    from trl_gfn.evaluation.preference_benchmark import PreferenceBenchmarkSettings, sample_images

    settings = PreferenceBenchmarkSettings(sample_num_steps=10)
    prompts = ["a handwritten digit"] * 96
    classifier = load_classifier()
    trainer = DiffusionDPOTrainer(DiffusionDPOConfig(num_epochs=2, train_learning_rate=3e-3, logdir=str(tmp_path), run_name="r", save_freq=0),
                                  load_pipeline(), load_digits_preferences("train").select(range(600)))
    with trainer.pipeline.reference_mode():
        base = round_utility(classifier, sample_images(trainer.pipeline, settings, prompts, 123)).numpy()
    trainer.train()
    tuned = round_utility(classifier, sample_images(trainer.pipeline, settings, prompts, 123)).numpy()
    result = win_rate(tuned, base, 0.1)
    assert (tuned > 0.5).mean() >= (base > 0.5).mean() + 0.1, ((base > 0.5).mean(), (tuned > 0.5).mean())
    assert result["win_rate"] > 0.6 and result["wins"] > 3 * result["losses"], result
    assert torch.isfinite(torch.tensor(trainer.last_metrics["loss"]))
