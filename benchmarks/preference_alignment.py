"""Preference alignment on the bundled digits model: every preference loss, the same budget, 3 seeds, and a robustness
sweep over the share of minority (flipped) labels (see docs/preference.md).

Data: the bundled pairs (``trl_gfn.assets.BUNDLED_DIGITS_PREFERENCES``, 2,000 training and 200 validation pairs of the
digits model under "a handwritten digit"), labelled by simulated annotators: the majority prefers round digits
{0, 6, 8, 9} (utility U = p(round | x) from the bundled classifier, Bradley–Terry noise, ties when |ΔU| < 0.1), a minority
holds the opposite preference. The main table uses the bundled share of minority labels (10 %); the robustness table
retrains Diffusion-DPO and Adaptive-DPO at 0 / 20 / 30 %. Every run: ``--epochs`` passes over the pairs in batches of
``--train_batch_size`` pairs, each loss type at its default β (``DiffusionDPOConfig``), then the evaluation of
``trl_gfn.evaluation.preference_benchmark`` after every epoch (win rate against the base model under the majority's true
utility on held-out noises, and after the last epoch on the ten class prompts; utility, round share, diversity, prior FD).

Each run is its own subprocess (``--jobs`` at a time, ``--threads`` torch threads each).

    python benchmarks/preference_alignment.py                        # 7 methods x 3 seeds + robustness, about 40 min on 2 cores (--jobs 2)
    python benchmarks/preference_alignment.py --quick                # smoke run (1 epoch on 400 pairs, 1 seed), a few minutes
    python benchmarks/preference_alignment.py --methods dpo,dmpo --seeds 0 --no_robustness

Writes ``<out>/results.json`` (settings, reference, every evaluation of every run), ``<out>/curves.png`` and ``<out>/table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from trl_gfn.evaluation.preference_benchmark import (  # noqa: E402
    DEFAULT_METHODS,
    METHODS,
    QUICK,
    ROBUSTNESS_FRACTIONS,
    ROBUSTNESS_METHODS,
    PreferenceBenchmarkSettings,
    compute_reference,
    epoch_table,
    main_table,
    plot,
    robustness_table,
    run_method,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/preference_benchmark", help="output folder")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--quick", action="store_true", help=f"smoke size: {QUICK}, seed 0, no robustness sweep")
    p.add_argument("--no_robustness", action="store_true", help="skip the minority-fraction sweep")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one process each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--skip_existing", action="store_true", help="reuse the runs whose <out>/runs/<name>.json exists (finish an interrupted benchmark)")
    for f in fields(PreferenceBenchmarkSettings):
        if f.name != "batch":
            p.add_argument(f"--{f.name}", type=type(f.default), default=None, help=f"default {f.default}")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> PreferenceBenchmarkSettings:
    kw = dict(QUICK) if args.quick else {}
    for f in fields(PreferenceBenchmarkSettings):
        v = getattr(args, f.name, None)
        if v is not None:
            kw[f.name] = v
    return PreferenceBenchmarkSettings(**kw)


def run_name(method: str, seed: int, fraction: float) -> str:
    return f"{method}_f{round(100 * fraction):02d}_seed{seed}"


def worker(args: argparse.Namespace) -> None:
    """Run one (method, seed, minority fraction) and write ``<out>/runs/<name>.json``."""
    import torch

    torch.set_num_threads(args.threads)
    method, seed, fraction = args.worker.split(":")
    settings = settings_from_args(args)
    reference = compute_reference(settings, cache=os.path.join(args.out, "reference.pt"))
    t0 = time.perf_counter()

    def log(rec):
        print(f"[{method} f={fraction} seed {seed}] epoch {rec['epoch']} step {rec['update_step']} train {rec['wall_time']:.0f}s "
              f"win {rec['win_rate']:.3f} round {rec['round_share']:.3f} div {rec['diversity']:.2f} FD {rec['prior_fd']:.2f} "
              f"val-acc {rec.get('eval/implicit_acc', float('nan')):.3f}", flush=True)

    run = run_method(method, int(seed), float(fraction), settings, reference, on_epoch=log)
    run["process_seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "runs", run_name(method, int(seed), float(fraction)) + ".json"), "w") as f:
        json.dump(run, f)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    import torch

    torch.set_num_threads(max(1, args.threads * args.jobs))
    settings = settings_from_args(args)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    seeds = [int(s) for s in (("0" if args.quick and args.seeds == "0,1,2" else args.seeds).split(",")) if s]
    robust = not (args.quick or args.no_robustness)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    t_start = time.perf_counter()
    reference = compute_reference(settings, cache=os.path.join(args.out, "reference.pt"))
    print(f"reference: base model on {settings.eval_samples} + {10 * settings.eval_class_samples} evaluation noises and "
          f"{settings.reference_samples} reference samples in {reference['seconds']:.0f}s; base round share "
          f"{(reference['utility'] > 0.5).mean():.3f}", flush=True)
    forwarded = []
    for f in fields(PreferenceBenchmarkSettings):
        if f.name != "batch":
            forwarded += [f"--{f.name}", str(getattr(settings, f.name))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    jobs = [(m, s, settings.minority_fraction) for s in seeds for m in methods]
    if robust:
        jobs += [(m, s, f) for f in ROBUSTNESS_FRACTIONS for s in seeds for m in ROBUSTNESS_METHODS if f != settings.minority_fraction]
    done = os.path.join(args.out, "runs", "{}.json")
    todo = [j for j in jobs if not (args.skip_existing and os.path.exists(done.format(run_name(*j))))]
    if len(todo) < len(jobs):
        print(f"reusing {len(jobs) - len(todo)} finished run(s) (--skip_existing)", flush=True)
    running, failed = [], []
    while todo or running:
        while todo and len(running) < args.jobs:
            m, s, f = todo.pop(0)
            log_path = os.path.join(args.out, "runs", run_name(m, s, f) + ".log")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{m}:{s}:{f}", "--out", args.out, "--threads", str(args.threads), *forwarded]
            running.append((subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env), run_name(m, s, f), log_path))
        time.sleep(0.5)
        for item in list(running):
            proc, name, log_path = item
            if proc.poll() is None:
                continue
            running.remove(item)
            lines = [ln for ln in open(log_path).read().splitlines() if ln.startswith("[")]
            if proc.returncode != 0:
                failed.append(name)
                print(f"{name}: FAILED (see {log_path})\n" + open(log_path).read()[-1500:], file=sys.stderr, flush=True)
            else:
                print(f"{name}: done ({time.perf_counter() - t_start:.0f}s)  {lines[-1] if lines else ''}", flush=True)
    runs = []
    for m, s, f in jobs:
        path = os.path.join(args.out, "runs", run_name(m, s, f) + ".json")
        if os.path.exists(path):
            runs.append(json.load(open(path)))
    wall = time.perf_counter() - t_start
    ref_json = {"seconds": reference["seconds"], "fd_floor": reference["fd_floor"], "diversity": reference["diversity"],
                "round_share": float((reference["utility"] > 0.5).mean()), "class_round_share": float((reference["class_utility"] > 0.5).mean())}
    results = {"settings": settings.to_dict(), "methods": {m: {"loss_type": METHODS[m][0], "overrides": METHODS[m][1], "note": METHODS[m][2]}
                                                           for m in methods},
               "seeds": seeds, "robustness": robust, "jobs": args.jobs, "threads_per_job": args.threads, "wall_time_seconds": wall,
               "failed": failed, "reference": ref_json, "runs": runs}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    if runs:
        rob_methods = [m for m in ROBUSTNESS_METHODS if m in methods]
        title = (f"bundled digits model, simulated annotators (majority: round digits), {settings.epochs} epochs x batch "
                 f"{settings.train_batch_size}, {len(seeds)} seed(s), {100 * settings.minority_fraction:.0f} % minority labels (mean ± std)")
        plot(runs, settings.minority_fraction, os.path.join(args.out, "curves.png"), rob_methods if robust else [], title=title)
        table = main_table(runs, settings.minority_fraction, reference, settings.tie_threshold)
        table += "\nWin rate vs base after each epoch:\n\n" + epoch_table(runs, settings.minority_fraction)
        if robust:
            table += "\nFinal win rate vs share of minority labels:\n\n" + robustness_table(runs, rob_methods)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table)
        print("\n" + table)
    print(f"benchmark wall time {wall:.0f}s ({wall / 60:.1f} min); outputs in {args.out}", flush=True)
    if failed:
        raise SystemExit(f"failed runs: {failed}")
    return results


if __name__ == "__main__":
    main()
