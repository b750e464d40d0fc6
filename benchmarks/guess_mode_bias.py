"""Does Nabla-GFlowNet's guessed log-flow favour one mode of the target, and does it separate the states heading into S
from those heading elsewhere as much as the true flow does? Measured on base-model trajectories of the bundled digits
model, no training.

At an interior state x_k the shipped loss fits the policy's score residual to the gradient of the guessed log-flow
β·γ_k·r(x̂_0(x_k)) (plus the learned flow head), with x̂_0 the reference model's one-step prediction and γ_k the shipped
configuration's (saturating in β, ᾱ_k at β = 30; ``--gamma squared``: ᾱ_k at every β). The exact log-flow is
log F̃_k(x_k) = log E_ref[exp(β r(x_0)) | x_k]. This script draws ``--samples`` base trajectories (10 DDPM steps, η = 1,
CFG 2: the benchmark's sampler), groups them by the class of their final sample (each digit of S, and "outside S"), and
prints per sampling position k

- ``p_S``: the classifier's mass on S of the one-step x̂_0, mean over the group's trajectories;
- ``gap`` (nats): log mean exp of the guessed log-flow over the group, minus the same over all trajectories heading into S.
  On the last row (x_0, the exact reward) this is the target's own tilt, log(target_c / base_c) − log(target_S / base_S):
  how much the exact flow favours the group over S as a whole. A digit of S whose gap at the noisy steps exceeds that
  pulls mass towards it beyond what the target asks; the "outside S" gap is how strongly the guess pushes mass into S;
- with ``--rollouts R`` > 0, ``truth``: the same gap of the Monte-Carlo log-flow log mean_j exp(β r(x_0^j)) over R
  reference rollouts from each state (``trl_gfn.evaluation.soft_value``; positions 1 … K−1, the x_0 row is exact).

    python benchmarks/guess_mode_bias.py                                   # S = {0,8}, {3,7}, {2,5,6}; β = 30; 512 samples; ~1 min
    python benchmarks/guess_mode_bias.py --targets 0,8 --beta 3 --samples 96 --rollouts 64   # with the Monte-Carlo truth
    python benchmarks/guess_mode_bias.py --targets 2,5,6 --samples 64      # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
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
    p.add_argument("--gamma", choices=["shipped", "squared"], default="shipped",
                   help="γ_k of the guess: the shipped digits configuration's (default; saturating, ᾱ_k at β = 30) or ᾱ_k at every β")
    p.add_argument("--samples", type=int, default=512, help="base trajectories")
    p.add_argument("--rollouts", type=int, default=0,
                   help="Monte-Carlo reference rollouts per state for the true log-flow (0: none; each state costs R x remaining steps, "
                        "and they are drawn again for each target set: give one --targets with it)")
    p.add_argument("--seed", type=int, default=30_000_000, help="first sample seed (disjoint from the benchmark's evaluation and reference seeds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/guess_mode_bias")
    args = p.parse_args(argv)
    if args.samples < 1 or args.rollouts < 0 or args.beta <= 0:
        p.error(f"--samples must be >= 1, --rollouts >= 0 and --beta > 0 (got {args.samples}, {args.rollouts}, {args.beta})")
    return args


def _fmt(value: float, signed: bool) -> str:
    """A table cell: "–" where a group has no trajectory or a position has no estimate."""
    if math.isnan(value):
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def guess_gamma(level, beta: float, which: str) -> float:
    """γ_k of the guess at a sampling position: the shipped digits configuration's, or ᾱ_k (``"squared"``)."""
    from trl_gfn.evaluation.digits_benchmark import METHODS

    config = METHODS["nabla_gfn"][2]
    scaling = "squared" if which == "squared" else config["reward_gradient_scaling"]
    beta_c = config.get("reward_gradient_saturation_reward_scale") or beta
    return float(level.gamma(scaling, saturation=beta / beta_c).flatten()[0])


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch

    from trl_gfn.diffusion import predict_x0
    from trl_gfn.evaluation.digits_benchmark import BenchmarkSettings, load_pipeline, load_reward
    from trl_gfn.evaluation.metrics import classifier_outputs, importance_weights
    from trl_gfn.evaluation.soft_value import soft_value_gradient

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
            gammas.append(guess_gamma(level, args.beta, args.gamma))
        log_p.append(torch.log_softmax(classifier_outputs(traj.images.float(), classifier)[0].double(), -1))
        gammas.append(1.0)
    final = log_p[-1].argmax(-1).numpy()

    def log_mean_exp(v):
        return float(np.logaddexp.reduce(v) - np.log(len(v))) if len(v) else float("nan")

    def true_log_flows(s) -> list:
        """Per position 1 … K−1, the Monte-Carlo log F̃_k of every trajectory's state (``--rollouts`` reference rollouts)."""
        reward_fn = load_reward(s)
        flows = []
        for k in range(1, K):
            est = soft_value_gradient(pipeline, schedule, reward_fn, traj.latents[:, k], k, prompts=[settings.prompt] * n,
                                      guidance_scale=settings.guidance_scale, beta=args.beta, num_rollouts=args.rollouts,
                                      chunk_size=args.rollouts, seed=args.seed + k)
            flows.append(est.log_value.double().numpy())
        return flows

    results: dict = {"beta": args.beta, "gamma_rule": args.gamma, "samples": n, "rollouts": args.rollouts, "gamma": gammas,
                     "targets": {}}
    lines = [f"β = {args.beta:g}, {n} base trajectories, γ_k: {args.gamma}; gap = log mean exp of β·γ_k·r(x̂_0) over the trajectories "
             "heading to each group minus the same over all trajectories heading into S (nats; on the x_0 row: the target's tilt); "
             "p_S = classifier mass on S of x̂_0" + (f"; truth = the same gap of the Monte-Carlo log-flow ({args.rollouts} reference "
                                                     "rollouts per state)" if args.rollouts else ""), ""]
    for s in targets:
        r = [torch.logsumexp(lp[:, s], -1).numpy() for lp in log_p]  # (K+1) x n
        into = np.isin(final, s)
        groups = [(str(c), final == c) for c in s] + [("outside S", ~into)]
        w, _ = importance_weights(r[-1], args.beta)
        base = np.array([m.mean() for _, m in groups])
        target = np.array([w[m].sum() for _, m in groups])
        truth = true_log_flows(s) if args.rollouts else None
        rows = []
        for k in range(K + 1):
            flow = args.beta * gammas[k] * r[k]
            row = {"position": k, "gamma": gammas[k], "p_S": [float(np.exp(r[k][m]).mean()) if m.any() else float("nan") for _, m in groups],
                   "gap": [log_mean_exp(flow[m]) - log_mean_exp(flow[into]) for _, m in groups]}
            if truth is not None:
                exact = args.beta * r[k] if k == K else (truth[k - 1] if k >= 1 else None)
                row["truth_gap"] = ([log_mean_exp(exact[m]) - log_mean_exp(exact[into]) for _, m in groups] if exact is not None
                                    else [float("nan")] * len(groups))
            rows.append(row)
        results["targets"][",".join(map(str, s))] = {"digits": s, "groups": [g for g, _ in groups], "base": base.tolist(),
                                                      "target": target.tolist(), "counts": [int(m.sum()) for _, m in groups], "rows": rows}
        cell = "p_S, gap" + (", truth" if truth is not None else "")
        head = " | ".join(f"{g}: {cell}" for g, _ in groups)
        lines += [f"S = {{{','.join(map(str, s))}}}: trajectories per group {[int(m.sum()) for _, m in groups]}; target / base per group "
                  + ", ".join(f"{g}: {t:.3f} / {b:.3f}" for (g, _), t, b in zip(groups, target, base))
                  + " (SNIS, β)", "",
                  f"| position k | γ_k | {head} |", "|---|---|" + "---|" * len(groups)]
        for row in rows:
            name = "x_0 (exact r)" if row["position"] == K else str(row["position"])
            values = zip(row["p_S"], row["gap"], row.get("truth_gap", [None] * len(groups)))
            cells = " | ".join(", ".join(_fmt(v, sign) for v, sign in ((p, False), (g, True), (t, True)) if v is not None)
                               for p, g, t in values)
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
