"""Does the trained policy realise its own forward target? Per sampling position, and separately for trajectories that
end in S and outside S, on the bundled digits model.

The forward ∇-DB term regresses the policy's score residual r_θ(x_k) = (μ_θ − μ_ref)/σ² onto the flow gradient
f(x') = β γ ∇r(x̂_0(x')) + g_φ(x') at the sampled next state x' ~ P_θ(·|x_k). Its minimiser at each state is the
on-policy average T̄(x_k) = E_{x'~P_θ(·|x_k)}[f(x')], whatever the target is. This script trains a Nabla-GFlowNet method
of the digits benchmark, samples ``--states`` trajectories of the trained policy, and at each of their states compares
r_θ with T̄ estimated from ``--next_states`` draws of x':

- ``along``: r_θ · T̄ / ‖T̄‖², the fraction of its own target the policy makes (1 = the regression's minimiser);
- ``cos``: the cosine of r_θ with T̄; ``‖r‖`` and ``‖T̄‖``;
- ``spread``: mean ‖f(x') − T̄‖² / ‖T̄‖², how noisy a one-draw target is relative to its mean (over all states).

No Monte-Carlo rollouts: this measures the fit, not the target (``flow_gradient_error.py`` measures the target).
Writes ``<out>/forward_target_fit.json`` and ``<out>/forward_target_fit.md``.

    python benchmarks/forward_target_fit.py --reward_scale 3          # 200 updates, 32 states x 12 next states, ~6 min on 2 cores
    python benchmarks/forward_target_fit.py --epochs 0 --states 4 --next_states 2   # untrained: the residual is 0
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--epochs", type=int, default=50, help="training epochs (0: the untrained policy, whose residual is 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward_scale", type=float, default=None, help="β (default: the benchmark's, 30)")
    p.add_argument("--target_digits", default=None, help="S, comma-separated (default: the benchmark's, 0,8)")
    p.add_argument("--states", type=int, default=32, help="trajectories of the trained policy whose states are measured")
    p.add_argument("--next_states", type=int, default=12, help="draws x' ~ P_θ(·|x_k) per state for T̄")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="outputs/forward_target_fit")
    args = p.parse_args(argv)
    for name in ("epochs", "states", "next_states"):
        if getattr(args, name) < (0 if name == "epochs" else 1):
            p.error(f"--{name} must be >= {0 if name == 'epochs' else 1}, got {getattr(args, name)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from trl_gfn.diffusion.gaussian import step_mean
    from trl_gfn.evaluation.digits_benchmark import METHODS, BenchmarkSettings, build_trainer, load_reward, score

    if METHODS.get(args.method, ("",))[0] != "NablaGFlowNetTrainer":
        raise SystemExit(f"--method must be a Nabla-GFlowNet method of the digits benchmark, got {args.method!r}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    overrides = {} if args.reward_scale is None else {"reward_scale": args.reward_scale}
    if args.target_digits is not None:
        overrides["target_digits"] = [int(d) for d in args.target_digits.split(",")]
    settings = BenchmarkSettings(epochs=max(args.epochs, 1), **overrides)
    reward = load_reward(settings.target_digits)
    trainer = build_trainer(args.method, args.seed, settings, reward)
    t0, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        step = trainer.step(epoch, step)
    train_seconds = time.perf_counter() - t0

    pipe, sched = trainer.pipeline, trainer.schedule
    n, K = args.states, trainer.schedule.num_steps
    prompts = [settings.prompt] * n
    traj = pipe.sample(prompts, sched, guidance_scale=settings.guidance_scale,
                       generators=[torch.Generator().manual_seed(4242 + i) for i in range(n)])
    logits, _, _ = score(traj.images.float().cpu(), reward)
    in_s = torch.tensor([int(d) in settings.target_digits for d in logits.argmax(1).tolist()])
    gen = torch.Generator().manual_seed(args.seed + 5)
    rows = []
    for p in range(K):
        x = traj.latents[:, p].float()
        idx = torch.full((n,), p, dtype=torch.long)
        cx, ce, std = (sched.gather(name, idx, like=x) for name in ("coef_x", "coef_eps", "std"))
        mean = step_mean(x, traj.epsilons[:, p].float(), cx, ce)  # the policy's step: its ε̂ was recorded while sampling
        draws = torch.stack([trainer.flow_gradient(mean + std * torch.randn(mean.shape, generator=gen), p + 1, prompts)
                             for _ in range(args.next_states)]).flatten(2)
        t_bar = draws.mean(0)
        residual = trainer.policy_score_residual(x, p, prompts).flatten(1)
        t_sq = (t_bar * t_bar).sum(1).clamp(min=1e-30)
        along = (residual * t_bar).sum(1) / t_sq
        cos = torch.nn.functional.cosine_similarity(residual, t_bar, dim=1)
        spread = ((draws - t_bar) ** 2).sum(2).mean(0) / t_sq
        row = {"position": p, "timestep": int(sched.timesteps[p]), "spread": float(spread.mean())}
        for group, mask in (("in_S", in_s), ("outside_S", ~in_s)):
            if bool(mask.any()):
                row[group] = {"along": float(along[mask].mean()), "cos": float(cos[mask].mean()),
                              "residual_norm": float(residual[mask].norm(dim=1).mean()), "target_norm": float(t_bar[mask].norm(dim=1).mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"args": vars(args), "updates": step, "train_seconds": train_seconds, "in_S": int(in_s.sum()), "states": n, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "forward_target_fit.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(args.out, "forward_target_fit.md"), "w") as f:
        f.write(table)
    print(table)
    return result


def markdown(result: dict) -> str:
    """One row per sampling position: each group's along / cosine / ‖r‖ vs ‖T̄‖, and the one-draw spread."""
    n_in, n = result["in_S"], result["states"]

    def cell(g):
        return f"{g['along']:.2f} / {g['cos']:+.2f} / {g['residual_norm']:.2f} vs {g['target_norm']:.2f}" if g else "–"

    head = (f"{result['updates']} updates; {n_in} of {n} trajectories end in S\n\n"
            "| position | τ | ending in S: along / cos / ‖r‖ vs ‖T̄‖ | ending outside S: along / cos / ‖r‖ vs ‖T̄‖ | one-draw spread |\n"
            "|---|---|---|---|---|\n")
    return head + "\n".join(f"| {r['position']} | {r['timestep']} | {cell(r.get('in_S'))} | {cell(r.get('outside_S'))} | {r['spread']:.2f} |"
                            for r in result["rows"]) + "\n"


if __name__ == "__main__":
    main()
