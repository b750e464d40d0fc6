"""Personalised preferences on the bundled digits model: PPD against a single-reward Diffusion-DPO, per user (docs/ppd.md).

Simulated users (trl_gfn.data.personalized): user u prefers the digits of a set S_u; users 0-3 are seen in training (the bundled
training pairs, relabelled per user), users 4-5 are unseen (only 4 of their validation pairs, for their embedding). Methods,
same budget (--epochs passes, batches of 16 pairs, lr 1e-3, beta 500, LoRA rank 8):

- ``dpo``: Diffusion-DPO on the pooled pairs of users 0-3 (one model for everyone);
- ``ppd``: PPD on the same pairs, the policy conditioned on the pair's user embedding (bundled DigitsUserEncoder, 4 pairs/user).

Evaluation, per user: --samples images under "a handwritten digit" from held-out noises, the same noises for the base model;
win rate against the base under the user's true utility p(y in S_u | x) (ties |dU| < 0.1 count 1/2) and the mean utility. PPD
samples with the user's tokens (seen: their training embedding; unseen: from 4 validation pairs), DPO and the base without.
Interpolation: PPD with (1 - a) e_0 + a e_1 for a in 0, 0.25, 0.5, 0.75, 1, mean utility under users 0 and 1.

    python benchmarks/personalized_preferences.py --seeds 0,1,2 --out outputs/ppd
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def run(method: str, seed: int, args, classifier, base_utils) -> dict:
    import torch

    from trl_gfn import DiffusionDPOConfig, DiffusionDPOTrainer, PPDConfig, PPDTrainer
    from trl_gfn.data.digits_preferences import CAPTION, load_digits_preferences, load_pipeline
    from trl_gfn.data.personalized import SEEN_USERS, USER_DIGIT_SETS, personalized_preferences, set_utility
    from trl_gfn.data.preference import PreferencePairs
    from trl_gfn.evaluation import win_rate
    from trl_gfn.testing import reset_accelerate_state

    reset_accelerate_state()
    train = personalized_preferences(load_digits_preferences("train"))
    train = train.filter(lambda r: r["user_id"] in SEEN_USERS)
    common = dict(num_epochs=args.epochs, train_batch_size=16, train_learning_rate=1e-3, lora_rank=8, seed=seed, save_freq=0, eval_freq=0,
                  logdir=tempfile.mkdtemp(prefix="ppd_bench_"), run_name=f"{method}_{seed}")
    t0 = time.perf_counter()
    if method == "ppd":
        trainer = PPDTrainer(PPDConfig(**common), load_pipeline(), train)
    else:
        trainer = DiffusionDPOTrainer(DiffusionDPOConfig(**common), load_pipeline(), train)
    trainer.train()
    seconds = time.perf_counter() - t0
    pipe = trainer.pipeline
    schedule = pipe.make_schedule("ddpm", 20, 1.0)
    gens = lambda: [torch.Generator().manual_seed(args.eval_seed + i) for i in range(args.samples)]  # noqa: E731

    def sample(embedding=None):
        tokens = None if embedding is None else trainer.user_tokens(embedding[None].expand(args.samples, -1))
        with torch.no_grad():
            return pipe.sample([CAPTION] * args.samples, schedule, guidance_scale=3.0, generators=gens(), extra_tokens=tokens).images

    val = PreferencePairs(personalized_preferences(load_digits_preferences("validation")), resolution=min(pipe.image_size), name="validation")
    owners = val.dataset["user_id"]
    shared = None if method == "ppd" else sample()
    out = {"method": method, "seed": seed, "train_seconds": seconds, "users": {}, "interpolation": []}
    embeddings = {}
    for u, digits in USER_DIGIT_SETS.items():
        if method == "ppd":
            if u in SEEN_USERS:
                e = trainer.user_embedding(u)
            else:
                ctx = val.load([i for i, row in enumerate(val.rows) if owners[row] == u][:4])
                e = trainer.embed_user(ctx.winners, ctx.losers, ctx.captions)
            embeddings[u] = e
            images = sample(e)
        else:
            images = shared
        util = set_utility(classifier, images, digits).numpy()
        wr = win_rate(util, base_utils[u], tie_threshold=0.1)["win_rate"]
        out["users"][u] = {"seen": u in SEEN_USERS, "win_rate": float(wr), "utility": float(util.mean()), "base_utility": float(base_utils[u].mean())}
    for a in ALPHAS:
        if method == "ppd":
            images = sample((1 - a) * embeddings[0] + a * embeddings[1])
        else:
            images = shared
        out["interpolation"].append({"alpha": a, "utility_user0": float(set_utility(classifier, images, USER_DIGIT_SETS[0]).mean()),
                                     "utility_user1": float(set_utility(classifier, images, USER_DIGIT_SETS[1]).mean())})
    trainer.accelerator.end_training()
    return out


def main(argv=None) -> None:
    import numpy as np
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/ppd_benchmark")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="dpo,ppd")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--eval_seed", type=int, default=10_000_000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from trl_gfn.data.digits_preferences import CAPTION, load_classifier, load_pipeline
    from trl_gfn.data.personalized import USER_DIGIT_SETS, set_utility

    os.makedirs(args.out, exist_ok=True)
    classifier = load_classifier()
    base = load_pipeline()
    with torch.no_grad():
        images = base.sample([CAPTION] * args.samples, base.make_schedule("ddpm", 20, 1.0), guidance_scale=3.0,
                             generators=[torch.Generator().manual_seed(args.eval_seed + i) for i in range(args.samples)]).images
    base_utils = {u: set_utility(classifier, images, d).numpy() for u, d in USER_DIGIT_SETS.items()}
    runs = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for method in args.methods.split(","):
            r = run(method, seed, args, classifier, base_utils)
            runs.append(r)
            print(f"[{method} seed {seed}] train {r['train_seconds']:.0f}s " + " ".join(
                f"u{u}:{v['win_rate']:.3f}" for u, v in r["users"].items()), flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump({"args": vars(args), "runs": runs}, f, indent=1)

    def fmt(xs):
        xs = np.asarray(xs, dtype=float)
        return f"{xs.mean():.3f} ± {xs.std(ddof=1):.3f}" if xs.size > 1 else f"{xs.mean():.3f}"

    methods = args.methods.split(",")
    lines = ["| user (preferred digits) | seen | base utility | " + " | ".join(f"{m} win rate | {m} utility" for m in methods) + " |",
             "|---|---|---|" + "---|---|" * len(methods)]
    for u, d in USER_DIGIT_SETS.items():
        cells = []
        for m in methods:
            rs = [r["users"][u] for r in runs if r["method"] == m]
            cells += [fmt([x["win_rate"] for x in rs]), fmt([x["utility"] for x in rs])]
        lines.append(f"| {u} {d} | {'yes' if u in (0, 1, 2, 3) else 'no'} | {base_utils[u].mean():.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| alpha (user 0 -> user 1) | PPD utility, user 0 | PPD utility, user 1 |", "|---|---|---|"]
    for i, a in enumerate(ALPHAS):
        rs = [r["interpolation"][i] for r in runs if r["method"] == "ppd"]
        if rs:
            lines.append(f"| {a} | {fmt([x['utility_user0'] for x in rs])} | {fmt([x['utility_user1'] for x in rs])} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
