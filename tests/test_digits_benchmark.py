"""The aligned-digits benchmark's core at a tiny size, its outputs, and the demo's argument parsing."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from trl_gfn.evaluation.digits_benchmark import (
    METHODS,
    BenchmarkSettings,
    compute_reference,
    markdown_table,
    plot_curves,
    run_method,
    save_grid,
    strip_images,
)

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = dict(epochs=1, sample_num_steps=3, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
            eval_samples=8, reference_samples=32, batch=32)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    settings = BenchmarkSettings(**TINY)
    out = tmp_path_factory.mktemp("bench")
    reference = compute_reference(settings, cache=str(out / "reference.pt"))
    run = run_method("nabla_gfn", 0, settings, reference)
    return settings, reference, run, out


def test_reference_is_cached_and_well_formed(tiny_run):
    settings, reference, _, out = tiny_run
    assert reference["features"].shape[0] == settings.reference_samples
    t = reference["target"]
    assert t["beta"] == settings.reward_scale and t["n"] == settings.reference_samples
    assert math.isclose(sum(t["hist"]), 1.0, rel_tol=1e-9) and 1 <= t["ess"] <= settings.reference_samples
    again = compute_reference(settings, cache=str(out / "reference.pt"))  # from the cache: same figures
    assert again["target"]["hist"] == t["hist"]


def test_run_structure_and_finite_figures(tiny_run):
    settings, _, run, _ = tiny_run
    assert run["method"] == "nabla_gfn" and run["seed"] == 0
    assert [e["epoch"] for e in run["epochs"]] == [0, 1]
    assert run["epochs"][0]["update_step"] == 0 and run["epochs"][-1]["update_step"] >= 1
    assert run["config"]["reward_scale"] == settings.reward_scale
    for rec in run["epochs"]:
        for key in ("reward_mean", "reward_std", "diversity", "diversity_vs_target", "prior_fd", "target_fd", "entropy", "mass_on_S", "tv",
                    "wall_time"):
            assert math.isfinite(rec[key]), key
        assert len(rec["class_histogram"]) == 10 and 0 <= rec["tv"] <= 1
        for judge in ("judge_cnn", "pixel_knn"):  # the independent judges' figures (tests/test_judges.py)
            assert all(0 <= rec[f"{k}_{judge}"] <= 1 for k in ("tv", "mass_on_S", "agreement"))
    assert run["images_after"].shape == (settings.eval_samples, 3, 16, 16)
    json.dumps(strip_images(run))  # JSON-serialisable without the images


def test_reference_holds_the_target_as_each_judge_sees_it(tiny_run):
    from trl_gfn.evaluation.digits_benchmark import evaluate_images
    from trl_gfn.evaluation.judges import judged_target_histogram, load_digit_judges

    settings, reference, run, _ = tiny_run
    assert set(reference["judge_target_hists"]) == set(load_digit_judges())
    for hist in reference["judge_target_hists"].values():
        assert len(hist) == 10 and math.isclose(float(sum(hist)), 1.0, rel_tol=1e-9)
    # with the reward's own classes the judged target is the benchmark's target
    same = judged_target_histogram(reference["labels"], reference["rewards"], settings.reward_scale)
    assert same.tolist() == pytest.approx(list(reference["target_hist"]), abs=1e-12)
    old = {k: v for k, v in reference.items() if k != "judge_target_hists"}
    with pytest.raises(ValueError, match="judges' target histograms"):
        evaluate_images(run["images_after"], None, old, settings.target_digits)


def test_table_plot_grid(tiny_run, tmp_path):
    _, reference, run, _ = tiny_run
    runs = [strip_images(run), dict(strip_images(run), seed=1)]
    table = markdown_table(runs, reference)
    assert "| nabla_gfn | 2 |" in table and "base model" in table and "ESS" in table
    # last column: TV averaged over the last evaluations (here the single trained one), per seed then over seeds
    fake = [dict(strip_images(run), seed=s, epochs=[dict(run["epochs"][0], tv=tv) for tv in tvs])
            for s, tvs in ((0, [0.8, 0.5, 0.1, 0.3]), (1, [0.8, 0.6, 0.2, 0.1]))]
    row = next(line for line in markdown_table(fake).splitlines() if line.startswith("| nabla_gfn"))
    assert "| 0.200 ± 0.141 |" in row  # final TV (0.3, 0.1)
    assert row.endswith("| 0.300 ± 0.000 |")  # mean of the (here 3) trained evaluations per seed: 0.3 and 0.3
    assert "TV, judge CNN" in table
    # runs written before the judges existed: their judge columns read "–"
    old = [dict(strip_images(run), epochs=[{k: v for k, v in e.items() if "judge" not in k and "knn" not in k} for e in run["epochs"]])]
    assert "| – | – |" in next(line for line in markdown_table(old).splitlines() if line.startswith("| nabla_gfn"))
    plot_curves(runs, str(tmp_path / "curves.png"))
    save_grid([run["images_before"], run["images_after"]], str(tmp_path / "grid.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "grid.png").stat().st_size > 0


def test_benchmark_cli_settings():
    bench = _load(ROOT / "benchmarks" / "digits_alignment.py", "digits_alignment")
    args = bench.parse_args(["--quick", "--epochs", "3", "--methods", "nabla_gfn,refl"])
    s = bench.settings_from_args(args)
    assert s.epochs == 3 and s.sample_batch_size == 8  # --quick size, explicit flag wins
    assert set(METHODS) >= {"nabla_gfn", "ddpo", "draft_k1", "draft_lv", "alignprop", "refl"}
    default = bench.settings_from_args(bench.parse_args([]))
    assert default == BenchmarkSettings() and default.epochs * default.samples_per_epoch // default.train_batch_size == 200  # updates
    other = bench.settings_from_args(bench.parse_args(["--target_digits", "7,3", "--reward_scale", "10"]))
    assert other.target_digits == [3, 7] and other.reward_scale == 10.0
    with pytest.raises(SystemExit):
        bench.parse_args(["--target_digits", "3,12"])
    assert "nabla_gfn_paper" in METHODS and all(m in METHODS for m in ("nabla_gfn_no_reg", "nabla_gfn_no_flow_head", "nabla_gfn_no_reverse",
                                                                        "nabla_gfn_unweighted", "nabla_gfn_jacobian_free"))


def test_target_relative_figures(tiny_run):
    settings, reference, run, _ = tiny_run
    tf = reference["target_features"]
    assert tf["eval_size"] == settings.eval_samples and tf["diversity"] > 0 and tf["fd_floor"] >= 0
    first = run["epochs"][0]
    assert first["diversity_vs_target"] == pytest.approx(first["diversity"] / tf["diversity"])


def test_calibration_summary(tiny_run, tmp_path):
    cal = _load(ROOT / "benchmarks" / "digits_calibration.py", "digits_calibration")
    _, reference, run, _ = tiny_run
    res = {"settings": {"target_digits": [0, 8]}, "reference": {"target": reference["target"]},
           "runs": [strip_images(run), dict(strip_images(run), seed=1), dict(strip_images(run), method="ddpo")]}
    table, panels = cal.summarise({3.0: res, 30.0: res}, ["nabla_gfn"])
    assert table.count("| nabla_gfn | 2 |") == 2 and "ddpo" not in table
    cal.plot(panels, str(tmp_path / "calibration.png"))
    assert (tmp_path / "calibration.png").stat().st_size > 0


def test_demo_argument_parsing():
    demo = _load(ROOT / "examples" / "digits_demo.py", "digits_demo")
    args = demo.parse_args([])
    assert args.out == "outputs/digits_demo" and not args.quick
    s = demo.settings_from_args(args)
    assert s.epochs == demo.DEMO_DEFAULTS["epochs"] and s.reward_scale == BenchmarkSettings().reward_scale
    q = demo.settings_from_args(demo.parse_args(["--quick", "--out", "x", "--reward_scale", "5"]))
    assert q.epochs == demo.DEMO_QUICK["epochs"] and q.reward_scale == 5.0 and q.sample_batch_size < s.sample_batch_size


def test_shipped_digits_yaml_is_the_benchmarks_nabla_gfn():
    """examples/configs/nabla_gfn_digits.yaml (what `examples/nabla_gfn.py` runs without flags) and the benchmark's
    `nabla_gfn` method are one configuration: every training field agrees."""
    import yaml

    from trl_gfn import NablaGFlowNetConfig
    from trl_gfn.cli import parse
    from trl_gfn.evaluation.digits_benchmark import method_config

    digits_yaml = ROOT / "examples" / "configs" / "nabla_gfn_digits.yaml"
    args, shipped, _ = parse(NablaGFlowNetConfig, [], str(digits_yaml))
    bench = method_config("nabla_gfn", shipped.seed, BenchmarkSettings())
    assert args.target_digits == BenchmarkSettings().target_digits
    skip = {"exp_name", "run_name", "logdir", "output_dir", "save_freq", "log_image_freq", "prompt_set", "log_with"}
    differ = {k: (v, getattr(bench, k)) for k, v in shipped.to_dict().items() if k not in skip and v != getattr(bench, k)}
    assert not differ, differ
    assert yaml.safe_load(digits_yaml.read_text())["num_epochs"] * 4 == 200  # 4 updates per epoch


def test_target_feasibility_script(tmp_path):
    """The exact-sampler figures: the tilted target concentrates on S, is less diverse than the base model and far
    from it in FD (the reason the benchmark judges samplers against the target, not the base model)."""
    feas = _load(ROOT / "benchmarks" / "digits_target_feasibility.py", "digits_target_feasibility")
    torch.set_num_threads(1)
    rows = feas.main(["--samples", "192", "--eval_size", "32", "--targets", "0,8;1", "--betas", "30", "--out", str(tmp_path)])
    assert [(r["target"], r["beta"]) for r in rows] == [([0, 8], 30.0), ([1], 30.0)]
    for r in rows:
        assert r["mass_on_S"] > 0.9 and 0 < r["ess"] <= 192
        assert r["diversity_vs_base"] < 0.95 and r["fd_to_base_population"] > 20
    assert (tmp_path / "feasibility.md").read_text().count("| {") == 2


def test_guess_mode_bias_script(tmp_path):
    """benchmarks/guess_mode_bias.py: per sampling position, the guessed log-flow's gap between the digits of S and of the
    trajectories heading outside S; on the x_0 row (exact reward) the gap is the target's own tilt
    log(target_c / base_c) − log(target_S / base_S), by SNIS, and the Monte-Carlo truth's gap equals it there."""
    gmb = _load(ROOT / "benchmarks" / "guess_mode_bias.py", "guess_mode_bias")
    torch.set_num_threads(1)
    out = gmb.main(["--targets", "2,5,6", "--samples", "48", "--out", str(tmp_path)])
    t = out["targets"]["2,5,6"]
    K = len(out["gamma"]) - 1
    assert K == BenchmarkSettings().sample_num_steps and out["gamma"][-1] == 1.0
    assert all(a < b for a, b in zip(out["gamma"][:-1], out["gamma"][1:]))  # γ_k rises towards x_0
    assert t["groups"] == ["2", "5", "6", "outside S"] and sum(t["counts"]) == 48
    rows = t["rows"]
    assert [r["position"] for r in rows] == list(range(K + 1))
    target_s, base_s = sum(t["target"][:3]), sum(t["base"][:3])
    assert sum(t["target"]) == pytest.approx(1.0) and sum(t["base"]) == pytest.approx(1.0)
    for gap, tgt, base, count in zip(rows[-1]["gap"], t["target"], t["base"], t["counts"]):
        if count:
            assert gap == pytest.approx(math.log(tgt / base) - math.log(target_s / base_s), abs=1e-6)
    assert rows[-1]["gap"][3] < -5  # at β = 30 the target all but removes the trajectories ending outside S
    assert all(0 <= p <= 1 for r in rows for p in r["p_S"] if p == p)
    assert (tmp_path / "guess_mode_bias.md").read_text().count("| x_0 (exact r) |") == 1
    assert "truth_gap" not in rows[0]


def test_guess_mode_bias_truth_and_gamma_rules(tmp_path):
    """--rollouts: the Monte-Carlo log-flow's gaps (positions 1 … K−1; exact on the x_0 row, equal to the guess's there);
    --gamma: the shipped configuration's γ_k saturates in β (larger than ᾱ_k at β = 3 on the noisy steps), equal to ᾱ_k
    at β = 30."""
    gmb = _load(ROOT / "benchmarks" / "guess_mode_bias.py", "guess_mode_bias")
    torch.set_num_threads(1)
    out = gmb.main(["--targets", "0,8", "--samples", "24", "--rollouts", "2", "--beta", "3", "--out", str(tmp_path)])
    rows = out["targets"]["0,8"]["rows"]
    K = len(rows) - 1
    assert all(g != g for g in rows[0]["truth_gap"])  # position 0 (the initial noise) is not rolled out
    counts = out["targets"]["0,8"]["counts"]
    assert counts[0] + counts[1] > 0 and counts[2] > 0  # these seeds give trajectories into S and outside it
    for k in range(1, K + 1):
        for g, c in zip(rows[k]["truth_gap"], counts):
            assert (g == g) == (c > 0 and counts[0] + counts[1] > 0)
    assert rows[-1]["truth_gap"] == pytest.approx(rows[-1]["gap"], nan_ok=True)
    assert "truth" in (tmp_path / "guess_mode_bias.md").read_text()
    squared = gmb.main(["--targets", "0,8", "--samples", "2", "--beta", "3", "--gamma", "squared", "--out", str(tmp_path / "sq")])
    assert all(s < g for s, g in zip(squared["gamma"][:5], out["gamma"][:5]))
    at_30 = gmb.main(["--targets", "0,8", "--samples", "2", "--out", str(tmp_path / "b30")])
    at_30_sq = gmb.main(["--targets", "0,8", "--samples", "2", "--gamma", "squared", "--out", str(tmp_path / "b30sq")])
    assert at_30["gamma"] == at_30_sq["gamma"]
    with pytest.raises(SystemExit):
        gmb.parse_args(["--rollouts", "-1"])


def test_forward_target_fit_script(tmp_path):
    """benchmarks/forward_target_fit.py: the untrained policy makes none of its forward target (its residual is exactly 0);
    after one epoch it makes some, and every position's groups, norms and the one-draw spread are reported."""
    fit = _load(ROOT / "benchmarks" / "forward_target_fit.py", "forward_target_fit")
    torch.set_num_threads(1)
    untrained = fit.main(["--epochs", "0", "--states", "6", "--next_states", "2", "--reward_scale", "3", "--out", str(tmp_path / "u")])
    K = BenchmarkSettings().sample_num_steps
    assert [r["position"] for r in untrained["rows"]] == list(range(K)) and untrained["updates"] == 0
    groups = [g for r in untrained["rows"] for g in (r.get("in_S"), r.get("outside_S")) if g]
    assert len(groups) >= K and all(g["residual_norm"] == 0 and g["along"] == 0 and g["target_norm"] > 0 for g in groups)
    assert all(r["spread"] > 0 for r in untrained["rows"])  # two draws of x' never give the same target
    trained = fit.main(["--epochs", "1", "--states", "4", "--next_states", "2", "--out", str(tmp_path / "t")])
    assert trained["updates"] == 4
    moved = [g for r in trained["rows"] for g in (r.get("in_S"), r.get("outside_S")) if g]
    assert all(g["residual_norm"] > 0 for g in moved) and any(g["along"] > 0 for g in moved)
    assert (tmp_path / "t" / "forward_target_fit.md").read_text().count("\n| ") == K + 1
    with pytest.raises(SystemExit):
        fit.parse_args(["--next_states", "0"])


def test_forward_target_sampler_solves_the_gaussian_tilt_exactly():
    """benchmarks/forward_target_sampler.py: with log F̃ = −‖x‖²/2 (f(x') = −x') the fixed point T = E_{N(μ + σ²T, σ²)}[f] is
    −μ/(1 + σ²), i.e. the step N(μ + σ²T, σ²) is the exact tilted transition N(μ, σ²)·F̃ ∝ N(μ/(1 + σ²), σ²/(1 + σ²)) in its
    mean; one round from T = 0 gives −μ (the reference step's average) and damping only slows the approach."""
    sampler = _load(ROOT / "benchmarks" / "forward_target_sampler.py", "forward_target_sampler")

    class GaussianFlow:
        @staticmethod
        def reward_guess(x, step_index, prompt_embeds, negative_prompt_embeds, prompts, prompt_metadata):
            assert step_index.tolist() == [1, 1]  # the guess at the next state's position
            return -x

    mu, std = torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 1, 1), 0.7)
    gen = torch.Generator().manual_seed(0)
    args = (None, None, ["p"] * 2)
    one, change = sampler.realised_target(GaussianFlow, mu, std, 0, *args, 1, 4000, 0.0, gen)
    assert change == 1.0 and torch.allclose(one, -mu, atol=0.05)
    for damping in (0.0, 0.5):
        T, change = sampler.realised_target(GaussianFlow, mu, std, 0, *args, 40, 4000, damping, gen)
        assert torch.allclose(T, -mu / (1 + std**2), atol=0.05), (damping, T.mean())
        assert change < 0.05
    zero, change = sampler.realised_target(GaussianFlow, mu, std, 0, *args, 0, 8, 0.0, gen)
    assert change == 0.0 and not zero.any()


def test_forward_target_sampler_script(tmp_path):
    """benchmarks/forward_target_sampler.py on the bundled model: the base pass makes no shift; realising the β = 30 forward
    target moves mass onto S from the same noises; figures, histograms and the per-position table are written."""
    sampler = _load(ROOT / "benchmarks" / "forward_target_sampler.py", "forward_target_sampler")
    torch.set_num_threads(1)
    out = sampler.main(["--samples", "16", "--iterations", "1", "--draws", "2", "--reward_scale", "30", "--reference_samples", "64",
                        "--sample_num_steps", "4", "--out", str(tmp_path)])
    assert [r["position"] for r in out["realised"]["rows"]] == [0, 1, 2, 3]
    assert all(r["target_norm"] == 0 and r["shift_in_std"] == 0 for r in out["base"]["rows"])
    assert all(r["target_norm"] > 0 and r["last_change"] == 1.0 for r in out["realised"]["rows"])
    assert out["realised"]["mass_on_S"] > out["base"]["mass_on_S"] + 0.2 and out["realised"]["tv"] < out["base"]["tv"] - 0.2
    assert abs(sum(out["realised"]["hist"]) - 1) < 1e-6
    assert (tmp_path / "forward_target_sampler.md").read_text().count("\n| ") == 2 + 4 + 2
    for bad in (["--draws", "0"], ["--iterations", "-1"], ["--damping", "1"]):
        with pytest.raises(SystemExit):
            sampler.parse_args(bad)


def test_timestep_spacing_setting_reaches_every_sampler(tmp_path):
    """--timestep_spacing trailing: the trainer's schedule starts from pure noise (τ = 999 … 99), the reference target is
    sampled with it and cached under its own key; an unknown spacing is refused by name."""
    from trl_gfn.evaluation.digits_benchmark import build_trainer, load_pipeline, load_reward

    bench = _load(ROOT / "benchmarks" / "digits_alignment.py", "digits_alignment")
    settings = bench.settings_from_args(bench.parse_args(["--timestep_spacing", "trailing"]))
    assert settings.timestep_spacing == "trailing" and BenchmarkSettings().timestep_spacing == "leading"
    tiny = BenchmarkSettings(**dict(TINY, sample_num_steps=4), timestep_spacing="trailing")
    trainer = build_trainer("nabla_gfn", 0, tiny, load_reward(tiny.target_digits))
    assert trainer.schedule.timesteps.tolist() == [999, 749, 499, 249]
    assert load_pipeline().make_schedule("ddpm", 4, 1.0).timesteps.tolist() == [751, 501, 251, 1]
    ref = compute_reference(tiny, cache=str(tmp_path / "reference.pt"))
    assert ref["key"]["timestep_spacing"] == "trailing"
    leading = compute_reference(BenchmarkSettings(**dict(TINY, sample_num_steps=4)), cache=str(tmp_path / "reference.pt"))
    assert "timestep_spacing" not in leading["key"] and leading["target"]["hist"] != ref["target"]["hist"]
    with pytest.raises(ValueError, match="timestep_spacing"):
        load_pipeline(timestep_spacing="uniform")


def test_eval_every_evaluates_before_every_nth_and_last_epoch(tiny_run):
    _, reference, _, _ = tiny_run
    settings = BenchmarkSettings(**dict(TINY, epochs=3, eval_every=2))
    run = run_method("refl", 0, settings, reference, keep_images=False)
    assert [e["epoch"] for e in run["epochs"]] == [0, 2, 3] == settings.evaluated_epochs
    assert run["epochs"][1]["wall_time"] < run["epochs"][2]["wall_time"]  # training time of every epoch counted
    with pytest.raises(ValueError, match="eval_every"):
        BenchmarkSettings(eval_every=0)


def test_gaussian_transition_limit_script(tmp_path):
    """benchmarks/gaussian_transition_limit.py, exact on a grid: the exact tilted transitions from the target's first marginal
    reproduce the target (a check of the backward flow recursion); at β = 0 every sampler is the reference; at β = 3 the
    Gaussian samplers move most of the mass into S but less than the exact chain, and bad arguments are refused."""
    gtl = _load(ROOT / "benchmarks" / "gaussian_transition_limit.py", "gaussian_transition_limit")
    results = gtl.main(["--betas", "0,3,30", "--steps", "4", "--grid", "301", "--flow_scales", "0.5", "--threads", "1",
                        "--out", str(tmp_path)])
    flat, tilted, steep = results
    # at β = 30 the flows reach e^-1000 far from S: computed in log space, the check holds there too
    assert steep["tilted_chain_from_tilted_start"] == pytest.approx(steep["target_mass_on_S"], abs=1e-9)
    assert all(math.isfinite(v) for v in steep["mass_on_S"].values())
    assert flat["steps"] == tilted["steps"] == 4
    assert list(flat["mass_on_S"]) == [*gtl.ROWS, "local fit, exact flow × 0.5"]
    for name in flat["mass_on_S"]:
        assert flat["mass_on_S"][name] == pytest.approx(flat["mass_on_S"]["reference"], abs=2e-3)
    assert flat["target_mass_on_S"] == pytest.approx(flat["mass_on_S"]["reference"], abs=1e-9)
    m = tilted["mass_on_S"]
    assert tilted["tilted_chain_from_tilted_start"] == pytest.approx(tilted["target_mass_on_S"], abs=1e-9)
    # from N(0, 1) the exact chain misses only what the initial noise already knows (little, even at K = 4)
    assert 0 < tilted["target_mass_on_S"] - m["exact tilted transitions"] < 0.01
    assert tilted["target_mass_on_S"] > 0.99 and 0.1 < m["reference"] < 0.3
    for name in ("local fit, exact flow", "ideal transition's mean", "path-KL optimum", "local fit, shipped guess"):
        assert 0.75 < m[name] < m["exact tilted transitions"], name
        assert tilted["tv"][name] == pytest.approx(tilted["target_mass_on_S"] - m[name])
    assert m["reference"] < m["local fit, exact flow × 0.5"] < m["local fit, exact flow"]  # half the flow moves less mass
    assert (tmp_path / "table.md").read_text().count("\n| 4 |") == 3
    assert json.loads((tmp_path / "results.json").read_text())["results"][1]["beta"] == 3.0
    for bad in (["--grid", "50"], ["--mass_s", "1.5"], ["--steps", "0"], ["--betas", "-1"], ["--width", "0"], ["--flow_scales", "x"]):
        with pytest.raises(SystemExit):
            gtl.parse_args(bad)
