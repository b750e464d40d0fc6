"""Calibration of Nabla-GFlowNet's β on the bundled digits model: for each β the fine-tuned class histogram against
the ideal target p_base·exp(β r) at that β (the knob a GFlowNet promises to honour).

Runs ``benchmarks/digits_alignment.py`` once per β (the shipped ``nabla_gfn`` method unless ``--methods`` says
otherwise, same seeds and sizes) into ``<out>/beta_<β>/`` and writes ``<out>/calibration.png`` (per β: target vs
fine-tuned class histograms, mean ± std over seeds) and ``<out>/calibration.md`` (TV, mass on S, reward per β).

    python benchmarks/digits_calibration.py                           # β = 3, 10, 30; 3 seeds; ~25 min on 2 cores
    python benchmarks/digits_calibration.py --betas 3,30 --seeds 0 --epochs 5   # smoke run

Other flags (``--target_digits``, ``--epochs``, ``--jobs``, …) are passed on to digits_alignment.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", default="3,10,30", help="comma-separated β values (reward_scale)")
    p.add_argument("--methods", default="nabla_gfn", help="methods of digits_alignment.py to calibrate")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="outputs/digits_calibration")
    p.add_argument("--reuse", action="store_true", help="reuse <out>/beta_<β>/results.json where it exists instead of rerunning that β")
    return p.parse_known_args(argv)


def main(argv=None) -> dict:
    args, rest = parse_args(argv)
    betas = [float(b) for b in args.betas.split(",") if b]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_alignment.py")
    results = {}
    for beta in betas:
        out = os.path.join(args.out, f"beta_{beta:g}")
        done = os.path.join(out, "results.json")
        if not (args.reuse and os.path.exists(done)):
            cmd = [sys.executable, script, "--reward_scale", str(beta), "--methods", args.methods, "--seeds", args.seeds, "--out", out, *rest]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        results[beta] = json.load(open(done))
    table, panels = summarise(results, args.methods.split(","))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "calibration.md"), "w") as f:
        f.write(table)
    plot(panels, os.path.join(args.out, "calibration.png"))
    print("\n" + table)
    return {"table": table, "results": {str(b): r["runs"] for b, r in results.items()}}


def summarise(results: dict[float, dict], methods: list[str]) -> tuple[str, list]:
    """The calibration table (markdown) and the plot's panels from ``{β: digits_alignment results.json}``."""
    rows, panels = [], []
    for beta, res in results.items():
        target = np.asarray(res["reference"]["target"]["hist"])
        digits = res["settings"]["target_digits"]
        by_method: dict[str, list] = {}
        for run in res["runs"]:
            if run["method"] in methods:
                by_method.setdefault(run["method"], []).append(run["epochs"][-1])
        for method, finals in by_method.items():
            hists = np.array([f["class_histogram"] for f in finals])
            tv = np.array([f["tv"] for f in finals])
            mass_target = float(target[digits].sum())
            rows.append(f"| {beta:g} | {method} | {len(finals)} | {tv.mean():.3f} ± {tv.std(ddof=1) if len(tv) > 1 else 0:.3f} | "
                        f"{mass_target:.3f} | {hists[:, digits].sum(1).mean():.3f} | "
                        f"{np.round(target[digits], 3).tolist()} | {np.round(hists[:, digits].mean(0), 3).tolist()} | "
                        f"{np.mean([f['reward_mean'] for f in finals]):.3f} |")
            panels.append((beta, method, target, hists))
    table = ("| β | method | seeds | TV to target | target mass on S | fine-tuned mass on S | target hist on S | fine-tuned hist on S | reward |\n"
             "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return table, panels


def plot(panels, path: str) -> None:
    """One panel per (β, method): the target's class histogram next to the fine-tuned one (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (beta, method, target, hists) in zip(axes[0], panels):
        x = np.arange(len(target))
        ax.bar(x - 0.2, target, width=0.4, label="target p_base·e^{βr}", color="grey")
        err = hists.std(0, ddof=1) if len(hists) > 1 else None
        ax.bar(x + 0.2, hists.mean(0), width=0.4, yerr=err, label=f"{method} ({len(hists)} seeds)", color="C0", capsize=2)
        ax.set_xticks(x)
        ax.set_title(f"β = {beta:g}", fontsize=10)
        ax.set_xlabel("class (digit)")
        ax.set_ylim(0, 1)
    axes[0, 0].set_ylabel("fraction of samples")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
