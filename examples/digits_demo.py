"""Aligned-digits demo: align the bundled pretrained digits model with Nabla-GFlowNet on the CPU.

The reward is the bundled classifier's r(x) = log p(y in {0, 8} | x) and the prompt the generic
"a handwritten digit": the ideal fine-tuned model p_base(x) · exp(β r(x)) keeps *both* modes (zeros and eights,
in the base model's proportions) and the pretrained model's style. The demo prints the metrics before and after
training (reward, diversity, distance to the base model, mode coverage, TV distance to that ideal target) and
saves into ``--out`` (default ``outputs/digits_demo``):

- ``before_after.png``: evaluation samples before | after (the same initial noise);
- ``curves.png``: reward, diversity, prior distance and TV vs update step and vs wall time;
- ``metrics.json``: every figure of every epoch, the settings and the target histogram.

    python examples/digits_demo.py            # 2-5 minutes on 2 CPU cores, depending on the CPU
    python examples/digits_demo.py --quick    # smoke run, well under a minute of training

Settings and evaluation come from ``trl_gfn.evaluation.digits_benchmark`` (shared with
``benchmarks/digits_alignment.py``, which compares every trainer; see docs/benchmark.md).
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

from trl_gfn.evaluation.digits_benchmark import QUICK, BenchmarkSettings  # noqa: E402

DEMO_DEFAULTS = dict(epochs=40, eval_samples=128, reference_samples=1024, eval_every=4)
DEMO_QUICK = dict(QUICK, epochs=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/digits_demo", help="output folder (default outputs/digits_demo)")
    p.add_argument("--quick", action="store_true", help="tiny smoke-run size")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {DEMO_DEFAULTS['epochs']}, --quick {DEMO_QUICK['epochs']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", choices=["nabla_gfn", "nabla_gfn_paper"], default="nabla_gfn",
                   help="nabla_gfn (default): the library's defaults; nabla_gfn_paper: the paper's exact loss "
                        "(NablaGFlowNetConfig.paper()), which barely moves in this budget (docs/benchmark.md)")
    p.add_argument("--reward_scale", type=float, default=None, help=f"β (default {BenchmarkSettings.reward_scale})")
    p.add_argument("--unet_reg_scale", type=float, default=None, help=f"λ (default {BenchmarkSettings.unet_reg_scale})")
    p.add_argument("--eval_every", type=int, default=None,
                   help=f"evaluate after every this many epochs and after the last (default {DEMO_DEFAULTS['eval_every']}; the benchmark: 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    kw = dict(DEMO_QUICK if args.quick else DEMO_DEFAULTS)
    for name in ("epochs", "reward_scale", "unet_reg_scale", "eval_every"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return BenchmarkSettings(**kw)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    from trl_gfn.evaluation.digits_benchmark import (
        compute_reference,
        load_reward,
        plot_curves,
        run_method,
        save_grid,
        strip_images,
    )

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"Nabla-GFlowNet on the bundled digits model: r = log p(y in {settings.target_digits} | x), β = {settings.reward_scale:g}, "
          f"λ = {settings.unet_reg_scale:g}, {settings.epochs} epochs x {settings.samples_per_epoch} samples x {settings.sample_num_steps} steps")
    reward_fn = load_reward(settings.target_digits)
    print(f"estimating the ideal target p_base·exp(βr) from {settings.reference_samples} base samples ...", flush=True)
    reference = compute_reference(settings, reward_fn, cache=os.path.join(args.out, "reference.pt"))
    bar = tqdm(total=len(settings.evaluated_epochs), desc=f"Nabla-GFlowNet, evaluated every {settings.eval_every} epoch(s)", unit="eval")

    def on_epoch(rec):
        bar.update(1)
        bar.set_postfix(reward=f"{rec['reward_mean']:.2f}", div=f"{rec['diversity']:.1f}", TV=f"{rec['tv']:.2f}")

    os.environ["TQDM_DISABLE"] = "1"  # the trainers' inner bars; ours is already built
    run = run_method(args.method, args.seed, settings, reference, reward_fn=reward_fn, on_epoch=on_epoch)
    bar.close()
    before, after = run["epochs"][0], run["epochs"][-1]
    rows = [("reward  log p(y∈S|x)", "reward_mean", "↑"), ("mass on S", "mass_on_S", "↑"), ("TV to ideal target", "tv", "↓"),
            ("TV, judge CNN", "tv_judge_cnn", "↓"), ("FD to ideal target", "target_fd", "↓"), ("diversity / target's", "diversity_vs_target", "→ 1"),
            ("FD to base model", "prior_fd", ""), ("class entropy", "entropy", "")]
    print(f"\n{'metric':<24}{'before':>10}{'after':>10}")
    for name, key, arrow in rows:
        print(f"{name:<24}{before[key]:>10.3f}{after[key]:>10.3f}  {arrow}")
    t = reference["target"]
    tf = reference["target_features"]
    print(f"(target at β={t['beta']:g}: ESS {t['ess']:.0f} of {t['n']}; an exact sampler of the target would read, with "
          f"{settings.eval_samples} samples, TV ≈ {reference['tv_noise_floor_eval_size']:.3f} and FD to target ≈ {tf['fd_floor']:.1f}; "
          f"the target keeps only the digits of S, so its own FD to the base model is large)")

    save_grid([run["images_before"][:64], run["images_after"][:64]], os.path.join(args.out, "before_after.png"))
    plot_curves([run], os.path.join(args.out, "curves.png"), title="Nabla-GFlowNet on the bundled digits model")
    metrics = {"settings": settings.to_dict(), "target": t, "tv_noise_floor": reference["tv_noise_floor_eval_size"],
               "fd_floor": reference["fd_floor_eval_size"], "before": before, "after": after, "run": strip_images(run),
               "seconds": time.perf_counter() - t0}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=float)
    print(f"saved before_after.png, curves.png, metrics.json in {args.out}  ({metrics['seconds']:.0f}s)")
    return metrics


if __name__ == "__main__":
    main()
