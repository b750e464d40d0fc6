"""Align the bundled digits model with r = log p(y in {0, 8} | x) using every trainer; compare reward, diversity,
prior preservation and distribution matching per update step and per wall second (see docs/benchmark.md).

Every method gets the same sampling budget: ``sample_batch_size x sample_num_batches_per_epoch`` samples of
``sample_num_steps`` DDPM steps (CFG ``guidance_scale``) per epoch, in micro-batches of ``train_batch_size``
(one optimizer update per micro-batch); the direct-backprop trainers (DRaFT, AlignProp, ReFL) draw the same
number of images, with gradient, per epoch. Before training and after every epoch the policy is evaluated on a
fixed evaluation set (the same initial noises for every method, seed and epoch; no gradient). The ideal target
``p_base · exp(β r)`` (β = Nabla-GFlowNet's ``reward_scale``) is estimated once by self-normalised importance
sampling from ``--reference_samples`` base-model samples (other seeds), cached in ``<out>/reference.pt``.

Each (method, seed) runs in its own subprocess (``--jobs`` at a time, ``--threads`` torch threads each).

    python benchmarks/digits_alignment.py                       # default size (3 seeds x 6 methods), ~13 min on 2 cores
    python benchmarks/digits_alignment.py --quick               # smoke run, ~2-3 min
    python benchmarks/digits_alignment.py --methods nabla_gfn,draft_k1 --seeds 0 --epochs 4

Writes ``<out>/results.json`` (settings, reference, every figure of every evaluation of every run),
``<out>/curves.png``, ``<out>/table.md`` and ``<out>/grids/<method>.png`` (evaluation samples of the first seed
before | after training).
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

from trl_gfn.evaluation.digits_benchmark import (  # noqa: E402
    DEFAULT_METHODS,
    METHODS,
    QUICK,
    BenchmarkSettings,
    compute_reference,
    markdown_table,
    plot_curves,
    run_method,
    save_grid,
    strip_images,
)


def _digits(text: str) -> list[int]:
    try:
        digits = sorted({int(d) for d in text.split(",") if d.strip()})
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--target_digits: expected comma-separated digits such as 0,8, got {text!r}") from err
    if not digits or any(d < 0 or d > 9 for d in digits):
        raise argparse.ArgumentTypeError(f"--target_digits: expected digits in 0..9, got {text!r}")
    return digits


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/digits_benchmark", help="output folder")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--quick", action="store_true", help=f"smoke size: {QUICK}, seeds 0,1")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one process each)")
    p.add_argument("--skip_existing", action="store_true",
                   help="keep the (method, seed) runs whose runs/<method>_seed<seed>.json already exists in --out (to finish an "
                        "interrupted benchmark); the settings must be the same, which the cached reference checks")
    p.add_argument("--summarise_only", action="store_true",
                   help="run nothing: rebuild results.json, table.md and curves.png from the runs/*.json already in --out "
                        "(those of --methods and --seeds that exist)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--target_digits", type=_digits, default=None, help="the target set S, comma-separated digits (default 0,8)")
    for f in fields(BenchmarkSettings):
        if f.name in ("target_digits", "prompt", "batch"):
            continue
        p.add_argument(f"--{f.name}", type=type(f.default), default=None, help=f"default {f.default}")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    kw = dict(QUICK) if args.quick else {}
    for f in fields(BenchmarkSettings):
        v = getattr(args, f.name, None)
        if v is not None:
            kw[f.name] = v
    return BenchmarkSettings(**kw)


def worker(args: argparse.Namespace) -> None:
    """Run one (method, seed) and write ``<out>/runs/<method>_seed<seed>.json`` and ``.pt`` (images)."""
    import torch

    torch.set_num_threads(args.threads)
    method, seed = args.worker.split(":")
    settings = settings_from_args(args)
    reference = compute_reference(settings, cache=os.path.join(args.out, "reference.pt"))
    t0 = time.perf_counter()

    def log(rec):
        print(f"[{method} seed {seed}] epoch {rec['epoch']} step {rec['update_step']} train {rec['wall_time']:.0f}s "
              f"reward {rec['reward_mean']:.3f} TV {rec['tv']:.3f} FD-target {rec['target_fd']:.2f} div/target {rec['diversity_vs_target']:.2f} "
              f"FD-base {rec['prior_fd']:.2f}", flush=True)

    run = run_method(method, int(seed), settings, reference, on_epoch=log)
    run["process_seconds"] = time.perf_counter() - t0
    base = os.path.join(args.out, "runs", f"{method}_seed{seed}")
    torch.save({"before": run["images_before"][:32].clone(), "after": run["images_after"][:32].clone()}, base + ".pt")
    with open(base + ".json", "w") as f:
        json.dump(strip_images(run), f)


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
    seeds = [int(s) for s in (("0,1" if args.quick and args.seeds == "0,1,2" else args.seeds).split(",")) if s]
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    t_start = time.perf_counter()
    reference = compute_reference(settings, cache=os.path.join(args.out, "reference.pt"))
    t = reference["target"]
    print(f"reference: {t['n']} base samples in {reference['seconds']:.0f}s; target histogram at beta={t['beta']:g}: "
          f"mass on S {sum(t['hist'][d] for d in settings.target_digits):.3f}, ESS {t['ess']:.0f}, target TV error {0.5 * 0.7979 * sum(t['stderr']):.3f}",
          flush=True)

    forwarded = []
    for f in fields(BenchmarkSettings):
        v = getattr(settings, f.name)
        if f.name == "target_digits":
            forwarded += ["--target_digits", ",".join(map(str, v))]
        elif f.name not in ("prompt", "batch"):
            forwarded += [f"--{f.name}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    todo = [(m, s) for s in seeds for m in methods
            if not args.summarise_only
            and not (args.skip_existing and os.path.exists(os.path.join(args.out, "runs", f"{m}_seed{s}.json")))]
    running: list[tuple[subprocess.Popen, str, str]] = []
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            m, s = todo.pop(0)
            log_path = os.path.join(args.out, "runs", f"{m}_seed{s}.log")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{m}:{s}", "--out", args.out, "--threads", str(args.threads), *forwarded]
            running.append((subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env), f"{m}:{s}", log_path))
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
                print(f"{name}: done  ({time.perf_counter() - t_start:.0f}s)  {lines[-1] if lines else ''}", flush=True)

    runs, images = [], {}
    for m in methods:
        for s in seeds:
            base = os.path.join(args.out, "runs", f"{m}_seed{s}")
            if not os.path.exists(base + ".json"):
                continue
            runs.append(json.load(open(base + ".json")))
            if m not in images:
                images[m] = torch.load(base + ".pt")
    wall = time.perf_counter() - t_start
    ref_json = {k: v for k, v in reference.items() if k in ("target", "seconds", "fd_floor_eval_size", "tv_noise_floor_eval_size")}
    ref_json["base_histogram"] = list(map(float, reference["base_histogram"]))
    results = {"settings": settings.to_dict(), "methods": {m: {"trainer": METHODS[m][0], "config_class": METHODS[m][1], "overrides": METHODS[m][2],
                                                             "note": METHODS[m][3]} for m in methods},
               "seeds": seeds, "jobs": args.jobs, "threads_per_job": args.threads, "wall_time_seconds": wall, "failed": failed,
               "reference": ref_json, "runs": runs}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    if runs:
        title = (f"bundled digits model, r = log p(y∈{set(settings.target_digits)}|x), β = {settings.reward_scale:g}; "
                 f"{settings.samples_per_epoch} samples/epoch x {settings.epochs} epochs, {len(seeds)} seeds (mean ± std)")
        plot_curves(runs, os.path.join(args.out, "curves.png"), title=title)
        table = markdown_table(runs, reference)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table)
        for m, im in images.items():
            save_grid([im["before"], im["after"]], os.path.join(args.out, "grids", f"{m}.png"))
        print("\n" + table)
    print(f"benchmark wall time {wall:.0f}s ({wall / 60:.1f} min); outputs in {args.out}", flush=True)
    if failed:
        raise SystemExit(f"failed runs: {failed}")
    return results


if __name__ == "__main__":
    main()
