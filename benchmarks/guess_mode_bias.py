"""Does Nabla-GFlowNet's guessed log-flow favour one mode of the target? Measured on base-model trajectories of the bundled
digits model, no training.

At an interior state x_k the shipped loss fits the policy's score residual to the gradient of the guessed log-flow
β·γ_k·r(x̂_0(x_k)) (plus the learned flow head), with x̂_0 the reference model's one-step prediction (γ_k = ᾱ_k). The exact
log-flow is log E[exp(β r(x_0)) | x_k]: for two states both heading to digits of S (reward ≈ 0 at the end) it is nearly the
same. The guess evaluates the classifier on the *blurry* x̂_0 instead, and the classifier is more sure of some digits than
of others at a given noise level. This script draws ``--samples`` base trajectories (10 DDPM steps, η = 1, CFG 2: the
benchmark's sampler), groups them by the class of their final sample, and prints per sampling step k

- the classifier's mass on S of the one-step x̂_0 (``p_S``), mean over the trajectories heading to each digit of S;
- ``gap`` (nats): log mean exp of the guessed log-flow β·γ_k·r(x̂_0) over the trajectories heading to that digit, minus
  the same over all trajectories heading into S. On the last row (x_0, the exact reward) this is the target's own
  tilt, log(target_c / base_c) − log(target_S / base_S): how much the exact flow favours digit c over S as a whole. A
  guess whose gap at the noisy steps exceeds that pulls mass towards digit c there beyond what the target asks.

    python benchmarks/guess_mode_bias.py                                   # S = {0,8}, {3,7}, {2,5,6}; β = 30; 512 samples; ~1 min
    python benchmarks/guess_mode_bias.py --targets 2,5,6 --samples 64      # smoke run
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
    p.add_argument("--targets", default="0,8;3,7;2,5,6", help="target sets S, ';'-separated, digits comma-separated")
    p.add_argument("--beta", type=float, default=30.0, help="β (reward_scale)")
    p.add_argument("--samples", type=int, default=512, help="base trajectories")
    p.add_argument("--seed", type=int, default=30_000_000, help="first sample seed (disjoint from the benchmark's evaluation and reference seeds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/guess_mode_bias")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch

    from trl_gfn.diffusion import predict_x0
    from trl_gfn.evaluation.digits_benchmark import BenchmarkSettings, load_pipeline, load_reward
    from trl_gfn.evaluation.metrics import classifier_outputs, importance_weights

    torch.set_num_threads(args.threads)
    targets = [[int(d) for d in s.split(",")] for s in args.targets.split(";") if s.strip()]
    settings = BenchmarkSettings()
    pipeline = load_pipeline(use_lora=False)
    classifier = load_reward([0])
    schedule = pipeline.make_schedule("ddpm", settings.sample_num_steps, 1.0)
    K, n = schedule.num_steps, args.samples
    with torch.no_grad():
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(n)]
        traj = pipeline.sample([settings.prompt] * n, schedule, guidance_scale=settings.guidance_scale, generators=gens)
        # log-probabilities of the classifier on x̂_0 at every sampling position k = 0..K-1, then on x_0 (position K)
        log_p, gammas = [], []
        for k in range(K):
            level = schedule.level(torch.full((n,), k, dtype=torch.long), like=traj.latents[:, k])
            images = pipeline.decode(predict_x0(traj.latents[:, k], traj.epsilons[:, k], level)).float()
            log_p.append(torch.log_softmax(classifier_outputs(images, classifier)[0].double(), -1))
            gammas.append(float(level.gamma("squared").flatten()[0]))
        log_p.append(torch.log_softmax(classifier_outputs(traj.images.float(), classifier)[0].double(), -1))
        gammas.append(1.0)
    final = log_p[-1].argmax(-1).numpy()

    def log_mean_exp(v):
        return float(np.logaddexp.reduce(v) - np.log(len(v)))

    results: dict = {"beta": args.beta, "samples": n, "gamma": gammas, "targets": {}}
    lines = [f"β = {args.beta:g}, {n} base trajectories; gap = log mean exp of β·γ_k·r(x̂_0) over the trajectories heading to each "
             "digit minus the same over all trajectories heading into S (nats; on the x_0 row: the target's tilt); p_S = classifier "
             "mass on S of x̂_0", ""]
    for s in targets:
        r = [torch.logsumexp(lp[:, s], -1).numpy() for lp in log_p]  # (K+1) x n
        into = np.isin(final, s)
        w, _ = importance_weights(r[-1], args.beta)
        base = np.array([(final == c).mean() for c in s])
        target = np.array([w[final == c].sum() for c in s])
        rows = []
        for k in range(K + 1):
            flow = args.beta * gammas[k] * r[k]
            rows.append({"position": k, "gamma": gammas[k],
                         "p_S": [float(np.exp(r[k][final == c]).mean()) for c in s],
                         "gap": [float(log_mean_exp(flow[final == c]) - log_mean_exp(flow[into])) for c in s]})
        results["targets"][",".join(map(str, s))] = {"digits": s, "base": base.tolist(), "target": target.tolist(), 
                                                      "counts": [int((final == c).sum()) for c in s], "rows": rows}
        head = " | ".join(f"{c}: p_S, gap" for c in s)
        lines += [f"S = {{{','.join(map(str, s))}}}: trajectories per digit {[int((final == c).sum()) for c in s]}; target / base per digit "
                  + ", ".join(f"{c}: {t:.3f} / {b:.3f}" for c, t, b in zip(s, target, base))
                  + " (SNIS, β)", "",
                  f"| position k | γ_k | {head} |", "|---|---|" + "---|" * len(s)]
        for row in rows:
            name = "x_0 (exact r)" if row["position"] == K else str(row["position"])
            cells = " | ".join(f"{p:.2f}, {g:+.2f}" for p, g in zip(row["p_S"], row["gap"]))
            lines.append(f"| {name} | {row['gamma']:.3f} | {cells} |")
        lines.append("")
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "guess_mode_bias.md"), "w") as fh:
        fh.write(table)
    with open(os.path.join(args.out, "guess_mode_bias.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(table)
    return results


if __name__ == "__main__":
    main()
