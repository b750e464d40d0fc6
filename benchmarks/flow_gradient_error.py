"""Is the flow gradient learned? Error of Nabla-GFlowNet's flow-gradient model β γ_k ∇r(x̂_0) + g_φ against the
Monte-Carlo ground truth ∇ log F̃_k, per timestep, before and after training, on the bundled digits model.

Trains one method of the digits benchmark (default the shipped ``nabla_gfn``) for ``--epochs`` epochs, samples
``--states`` trajectories with the trained policy, and at every sampling position of those trajectories compares,
against ``trl_gfn.evaluation.soft_value`` (reference rollouts weighted by exp(β r); score and pathwise estimates
combined by inverse variance):

- ``guess``: β γ_k ∇r(x̂_0(x)) alone, and ``guess+g``: with the flow head, before training (g at its initialisation)
  and after;
- ``policy``: the policy's score residual (μ_θ − μ_ref)/σ² against the ideal transition's (μ* − μ_ref)/σ².

Writes ``<out>/flow_gradient.json``, ``<out>/flow_gradient.md`` (a table per position) and ``<out>/flow_gradient.png``.

    python benchmarks/flow_gradient_error.py                   # 200 updates, 8 states x 2048 rollouts; ~40 min on 2 cores
    python benchmarks/flow_gradient_error.py --epochs 2 --states 2 --rollouts 256 --pathwise_rollouts 32   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="nabla_gfn", help="a Nabla-GFlowNet method of benchmarks/digits_alignment.py")
    p.add_argument("--epochs", type=int, default=50, help="training epochs (0: compare the untrained model's guess only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--states", type=int, default=8, help="trajectories whose states are evaluated")
    p.add_argument("--rollouts", type=int, default=2048, help="reference rollouts per state (score estimator)")
    p.add_argument("--pathwise_rollouts", type=int, default=128, help="rollouts per state of the pathwise estimator (0: score only)")
    p.add_argument("--reward_scale", type=float, default=None, help="β of the target and the method (default: the benchmark's, 30)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="outputs/flow_gradient")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from trl_gfn.evaluation.digits_benchmark import METHODS, BenchmarkSettings, build_trainer, load_reward
    from trl_gfn.evaluation.soft_value import flow_gradient_report

    if not METHODS.get(args.method, ("",))[0] == "NablaGFlowNetTrainer":
        raise SystemExit(f"--method must be a Nabla-GFlowNet method of the digits benchmark, got {args.method!r}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    # --epochs 0: the untrained model only ("after" = "before"); the config itself needs at least one epoch
    settings = BenchmarkSettings(epochs=max(args.epochs, 1), **({} if args.reward_scale is None else {"reward_scale": args.reward_scale}))
    reward = load_reward(settings.target_digits)
    trainer = build_trainer(args.method, args.seed, settings, reward)
    untrained = {k: copy.deepcopy(v.state_dict()) for k, v in (("lora", _LoraView(trainer)), ("head", trainer.flow_head)) if v is not None}
    t0 = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        step = trainer.step(epoch, step)
    train_seconds = time.perf_counter() - t0
    trained = {k: copy.deepcopy(v.state_dict()) for k, v in (("lora", _LoraView(trainer)), ("head", trainer.flow_head)) if v is not None}
    K = trainer.schedule.num_steps
    prompts = [settings.prompt] * args.states
    traj = trainer.pipeline.sample(prompts, trainer.schedule, guidance_scale=settings.guidance_scale,
                                   generators=[torch.Generator().manual_seed(777 + i) for i in range(args.states)])
    estimators = {"guess": lambda x, p: trainer.flow_gradient(x, p, prompts, include_flow_head=False),
                  "guess+g": lambda x, p: trainer.flow_gradient(x, p, prompts),
                  "g": lambda x, p: trainer.flow_gradient(x, p, prompts) - trainer.flow_gradient(x, p, prompts, include_flow_head=False)}
    residuals = {"policy": lambda x, p: trainer.policy_score_residual(x, p, prompts)}
    truths: dict = {}
    reports = {}
    for when, weights in (("after", trained), ("before", untrained)):
        _LoraView(trainer).load_state_dict(weights["lora"])
        if "head" in weights:
            trainer.flow_head.load_state_dict(weights["head"])
        reports[when] = flow_gradient_report(estimators, trainer.pipeline, trainer.schedule, reward, traj.latents, list(range(1, K + 1)),
                                             prompts=prompts, guidance_scale=settings.guidance_scale, beta=settings.reward_scale,
                                             num_rollouts=args.rollouts, chunk_size=min(512, args.rollouts), residual_estimators=residuals,
                                             truths=truths, pathwise_rollouts=args.pathwise_rollouts, seed=args.seed)
        print(f"[{when}] done", flush=True)
    os.makedirs(args.out, exist_ok=True)
    result = {"args": vars(args), "train_seconds": train_seconds, "updates": step, "reports": reports}
    with open(os.path.join(args.out, "flow_gradient.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(reports)
    with open(os.path.join(args.out, "flow_gradient.md"), "w") as f:
        f.write(table)
    plot(reports, os.path.join(args.out, "flow_gradient.png"))
    print(table)
    return result


class _LoraView:
    """The LoRA parameters of the trainer's UNet as a state dict (to swap trained / untrained weights)."""

    def __init__(self, trainer):
        self.params = dict((n, p) for n, p in trainer.pipeline.unet.named_parameters() if "lora_" in n)

    def state_dict(self):
        return {n: p.detach().clone() for n, p in self.params.items()}

    def load_state_dict(self, state):
        with __import__("torch").no_grad():
            for n, p in self.params.items():
                p.copy_(state[n])


def markdown(reports: dict) -> str:
    """One row per sampling position: the truth's size and error, then each model's relative error and cosine."""
    head = ("| position | τ | ‖∇log F̃‖ | MC rel. error | guess err / cos | guess+g before: err / cos | guess+g after: err / cos | "
            "‖g‖ after | policy residual after: err / cos (‖·‖ vs ideal) |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for b, a in zip(reports["before"], reports["after"]):
        pol = (f"{a['policy_rel_error']:.2f} / {a['policy_cosine']:+.2f} ({a['policy_norm']:.1f} vs {a['optimal_residual_norm']:.1f})"
               if "policy_rel_error" in a else "–")
        rows.append(f"| {a['position']} | {a['timestep']} | {a['true_norm']:.2f} | {a['mc_rel_error']:.2f} | "
                    f"{a['guess_rel_error']:.2f} / {a['guess_cosine']:+.2f} | {b['guess+g_rel_error']:.2f} / {b['guess+g_cosine']:+.2f} | "
                    f"{a['guess+g_rel_error']:.2f} / {a['guess+g_cosine']:+.2f} | {a['g_norm']:.2f} | {pol} |")
    return head + "\n".join(rows) + "\n"


def plot(reports: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    tau = [r["timestep"] for r in reports["after"]]
    for key, label, style in (("guess", "guess βγ∇r(x̂_0)", "k--"), ("guess+g", "guess + g_φ", "C0-")):
        for when, alpha in (("before", 0.45), ("after", 1.0)):
            if key == "guess" and when == "before":
                continue
            rows = reports[when]
            axes[0].plot(tau, [r[f"{key}_rel_error"] for r in rows], style, alpha=alpha, marker="o", ms=3,
                         label=f"{label}{'' if key == 'guess' else f' ({when})'}")
            axes[1].plot(tau, [r[f"{key}_cosine"] for r in rows], style, alpha=alpha, marker="o", ms=3)
    axes[0].plot(tau, [r["mc_rel_error"] for r in reports["after"]], ":", color="grey", label="MC error of the truth")
    for ax, title in zip(axes, ("relative error vs MC ∇ log F̃", "cosine with MC ∇ log F̃")):
        ax.set_xlabel("timestep τ of the state")
        ax.invert_xaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
