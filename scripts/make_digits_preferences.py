"""Build the bundled preference data: pairs sampled from the bundled digits model, labelled by simulated annotators.

    python scripts/make_digits_preferences.py                                # src/trl_gfn/assets/digits-preferences/{train,validation}.parquet
    python scripts/make_digits_preferences.py --output_dir /tmp/prefs --train_pairs 200 --validation_pairs 50 --minority_fraction 0.3

Deterministic from --seed (see trl_gfn.data.digits_preferences: image p/side from its own seed, labels from seeded
generators). The shipped files were written with the defaults; tests/test_digits_preferences.py regenerates their first
rows and compares. Prints the label counts of each split (ties, minority labels, labels against the majority's utility).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from trl_gfn.data.digits_preferences import (DATA_SEED, SAMPLE_GUIDANCE, SAMPLE_STEPS, SPLITS, AnnotatorPool, describe,
                                             generate_digits_preferences)


def main(argv=None) -> int:
    from trl_gfn.assets import BUNDLED_DIGITS_PREFERENCES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=BUNDLED_DIGITS_PREFERENCES)
    parser.add_argument("--train_pairs", type=int, default=SPLITS["train"][1])
    parser.add_argument("--validation_pairs", type=int, default=SPLITS["validation"][1])
    parser.add_argument("--seed", type=int, default=DATA_SEED)
    parser.add_argument("--minority_fraction", type=float, default=AnnotatorPool.minority_fraction)
    parser.add_argument("--num_annotators", type=int, default=AnnotatorPool.num_annotators)
    parser.add_argument("--bt_scale", type=float, default=AnnotatorPool.bt_scale)
    parser.add_argument("--tie_threshold", type=float, default=AnnotatorPool.tie_threshold)
    parser.add_argument("--num_steps", type=int, default=SAMPLE_STEPS)
    parser.add_argument("--guidance_scale", type=float, default=SAMPLE_GUIDANCE)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pool = AnnotatorPool(num_annotators=args.num_annotators, minority_fraction=args.minority_fraction, bt_scale=args.bt_scale,
                         tie_threshold=args.tie_threshold)
    os.makedirs(args.output_dir, exist_ok=True)
    # the validation pairs follow the training pairs' ids, so that both splits come from disjoint seeds
    splits = {"train": (0, args.train_pairs), "validation": (args.train_pairs, args.validation_pairs)}
    summary = {"seed": args.seed, "pool": vars(pool), "num_steps": args.num_steps, "guidance_scale": args.guidance_scale, "splits": {}}
    for name, (first, count) in splits.items():
        t0 = time.perf_counter()
        dataset = generate_digits_preferences(first, count, pool, seed=args.seed, num_steps=args.num_steps, guidance_scale=args.guidance_scale,
                                              progress=True)
        dataset.to_parquet(os.path.join(args.output_dir, f"{name}.parquet"))
        summary["splits"][name] = {"first_pair": first, **describe(dataset)}
        print(name, json.dumps(summary["splits"][name]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
