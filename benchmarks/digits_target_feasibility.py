"""What can a perfect sampler of p_base·exp(β r) score? The ideal target's own diversity and prior FD, per target set and β.

A fine-tuned model that samples the tilted target exactly does not keep the base model's diversity, nor a small
Fréchet distance to the base model: the target drops the digits outside S. This script measures, from
``--samples`` base-model samples (the digits benchmark's reference seeds), for each target set S and β:

- the target's histogram mass on S and its effective sample size (SNIS);
- its diversity at the evaluation size (resampled, mean of 20 draws) and that diversity / the base model's;
- its Fréchet distance to the base model: population figure (weighted feature Gaussian vs the base sample) and at
  the evaluation size (resampled 128 vs the base sample).

These are the figures of an *exact* sampler, so they bound what any trainer can honestly reach on the
"diversity ≥ c × base" and "prior FD ≤ d" bars (see docs/benchmark.md, "What the target allows").

    python benchmarks/digits_target_feasibility.py                          # 4096 samples, 5 target sets x 3 β; ~3 min on 1 core
    python benchmarks/digits_target_feasibility.py --samples 512 --targets 0,8 --betas 30   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4096, help="base-model samples (reference seeds of the digits benchmark)")
    p.add_argument("--targets", default="0,8;3,7;2,5,6;1;4,9", help="target sets S, ';'-separated, digits comma-separated")
    p.add_argument("--betas", default="3,10,30", help="comma-separated β")
    p.add_argument("--eval_size", type=int, default=128, help="evaluation size of the digits benchmark")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/target_feasibility")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import numpy as np
    import torch

    from trl_gfn.evaluation.digits_benchmark import BenchmarkSettings, load_pipeline, load_reward, sample_images, score
    from trl_gfn.evaluation.metrics import (
        frechet_distance,
        frechet_distance_from_stats,
        importance_weights,
        pairwise_diversity,
        target_features,
    )

    torch.set_num_threads(args.threads)
    targets = [[int(d) for d in s.split(",")] for s in args.targets.split(";") if s.strip()]
    betas = [float(b) for b in args.betas.split(",")]
    settings = BenchmarkSettings(reference_samples=args.samples, eval_samples=args.eval_size)
    pipeline = load_pipeline(use_lora=False)
    schedule = pipeline.make_schedule("ddpm", settings.sample_num_steps, 1.0)
    images = sample_images(pipeline, schedule, settings, args.samples, settings.reference_seed)
    logits, feats, _ = score(images, load_reward([0]))
    f = feats.double().numpy()
    log_p = torch.log_softmax(logits.double(), -1)
    labels = logits.argmax(-1).numpy()
    n_chunks = args.samples // args.eval_size
    base_div = float(np.mean([pairwise_diversity(f[i * args.eval_size:(i + 1) * args.eval_size]) for i in range(min(8, n_chunks))]))
    half = args.samples // 2
    base_fd_floor = float(np.mean([frechet_distance(f[i * args.eval_size:(i + 1) * args.eval_size], f[half:])
                                   for i in range(min(4, max(1, half // args.eval_size)))]))
    rows = []
    for s in targets:
        r = torch.logsumexp(log_p[:, s], -1).numpy()
        for beta in betas:
            w, _ = importance_weights(r, beta)
            tf = target_features(f, r, beta, args.eval_size)
            rng = np.random.default_rng(0)
            fd_eval = float(np.mean([frechet_distance(f[rng.choice(len(f), args.eval_size, p=w)], f) for _ in range(10)]))
            rows.append({
                "target": s, "beta": beta, "ess": float(1.0 / (w ** 2).sum()), "mass_on_S": float(w[np.isin(labels, s)].sum()),
                "target_reward": float(w @ r), "target_diversity": tf.diversity, "diversity_vs_base": tf.diversity / base_div,
                "fd_to_base_population": frechet_distance_from_stats(tf.mean, tf.cov, f.mean(0), np.cov(f, rowvar=False)),
                "fd_to_base_eval_size": fd_eval,
            })
    lines = [f"Base model: diversity {base_div:.2f}, base-vs-base FD floor {base_fd_floor:.1f} (eval size {args.eval_size}); "
             f"{args.samples} base samples.", "",
             "| S | β | ESS | target mass on S | target mean reward | target diversity | diversity / base | FD to base (population) | FD to base (eval size) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {{{','.join(map(str, row['target']))}}} | {row['beta']:g} | {row['ess']:.0f} | {row['mass_on_S']:.3f} | "
                     f"{row['target_reward']:.3f} | {row['target_diversity']:.2f} | {row['diversity_vs_base']:.2f} | "
                     f"{row['fd_to_base_population']:.1f} | {row['fd_to_base_eval_size']:.1f} |")
    table = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "feasibility.md"), "w") as fh:
        fh.write(table)
    with open(os.path.join(args.out, "feasibility.json"), "w") as fh:
        json.dump({"samples": args.samples, "eval_size": args.eval_size, "base_diversity": base_div,
                   "base_fd_floor": base_fd_floor, "rows": rows}, fh, indent=1)
    print(table)
    return rows


if __name__ == "__main__":
    main()
