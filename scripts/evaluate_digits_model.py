#!/usr/bin/env python
"""Measure the bundled digits model with the bundled classifier; measure the distribution-matching metric.

    python scripts/evaluate_digits_model.py --output docs/results/bundled_digits_eval.json

Reports (all with plain ``diffusers.StableDiffusionPipeline`` sampling, DDIM with ``--eta``,
``--steps`` steps, classifier-free guidance ``--guidance_scale``):

1. time to sample 64 images x 20 steps with CFG (best of 3, after a warm-up);
2. class-prompted accuracy ("a handwritten digit d", ``--per_digit`` per digit) for each CFG scale
   in ``--cfg_sweep`` and at the default scale;
3. the class histogram and its entropy under the generic prompt "a handwritten digit" (``--n_generic``);
4. the distribution-matching metric on that generic base sample: for the reward
   r = log p(y in {0, 8} | x), the SNIS target histogram of p_base exp(beta r) for a range of beta,
   with its effective sample size, delta-method and bootstrap errors, and a split-half check (the TV
   between the targets estimated from two disjoint halves of the base sample vs. the TV the error bars
   predict).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from trl_gfn.assets import BUNDLED_DIGIT_CLASSIFIER, BUNDLED_DIGITS_MODEL  # noqa: E402
from trl_gfn.evaluation import (  # noqa: E402
    class_histogram,
    classifier_outputs,
    histogram_entropy,
    ideal_target_histogram,
    pairwise_diversity,
    total_variation,
    tv_noise_floor,
)
from trl_gfn.rewards.digits import DigitClassifierReward  # noqa: E402


def sample(pipe, prompts, steps, cfg, eta, seed, batch=250):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch):
        out.append(pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=cfg, eta=eta, output_type="pt", generator=g).images)
    return torch.cat(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUNDLED_DIGITS_MODEL)
    p.add_argument("--classifier", default=BUNDLED_DIGIT_CLASSIFIER)
    p.add_argument("--output", default="docs/results/bundled_digits_eval.json")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--cfg_sweep", type=float, nargs="*", default=[1.0, 2.0, 3.0, 5.0])
    p.add_argument("--sweep_per_digit", type=int, default=50)
    p.add_argument("--per_digit", type=int, default=100)
    p.add_argument("--n_generic", type=int, default=4000)
    p.add_argument("--n_generic_eta0", type=int, default=1000)
    p.add_argument("--betas", type=float, nargs="*", default=[0, 0.5, 1, 2, 5, 10, 20, 50, 100, 300])
    p.add_argument("--target_digits", type=int, nargs="*", default=[0, 8])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", default="docs/images/bundled_digits_samples.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    clf = DigitClassifierReward.from_pretrained(args.classifier, target_digits=args.target_digits)
    res: dict = {"settings": {k: v for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads()}

    # 1. speed
    prompts64 = [f"a handwritten digit {i % 10}" for i in range(64)]
    sample(pipe, prompts64[:8], 2, 3.0, args.eta, 0)
    # wall time depends on the load of the machine; CPU time of this process (all threads) does not
    times, cpu = [], []
    for k in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        sample(pipe, prompts64, 20, 3.0, args.eta, k, batch=64)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    res["seconds_64_images_20_steps_cfg"] = {"wall_best": min(times), "cpu_best": min(cpu), "threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0]}
    print(f"sampling 64 x 20 steps + CFG: wall best {min(times):.2f}s (all {[round(t, 2) for t in times]}), "
          f"CPU best {min(cpu):.2f}s, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}", flush=True)

    def class_accuracy(cfg, per_digit, seed):
        prompts = [f"a handwritten digit {d}" for d in range(10) for _ in range(per_digit)]
        labels = np.repeat(np.arange(10), per_digit)
        imgs = sample(pipe, prompts, args.steps, cfg, args.eta, seed)
        logits, feats = classifier_outputs(imgs, clf)
        pred = logits.argmax(-1).numpy()
        per = {int(d): float((pred[labels == d] == d).mean()) for d in range(10)}
        return float((pred == labels).mean()), per, imgs, feats

    # 2. class-prompted accuracy, CFG sweep then the default
    res["cfg_sweep"] = {}
    for cfg in args.cfg_sweep:
        acc, per, _, feats = class_accuracy(cfg, args.sweep_per_digit, args.seed + int(cfg * 10))
        res["cfg_sweep"][str(cfg)] = {"accuracy": acc, "per_digit": per, "diversity": pairwise_diversity(feats)}
        print(f"CFG {cfg}: class-prompted accuracy {acc:.3f} ({args.sweep_per_digit}/digit) per digit {per}", flush=True)
    acc, per, class_imgs, _ = class_accuracy(args.guidance_scale, args.per_digit, args.seed)
    res["class_prompted"] = {"guidance_scale": args.guidance_scale, "per_digit_samples": args.per_digit, "accuracy": acc, "per_digit": per}
    print(f"default CFG {args.guidance_scale}: class-prompted accuracy {acc:.4f} per digit {per}", flush=True)

    # 3. generic prompt
    gen = sample(pipe, ["a handwritten digit"] * args.n_generic, args.steps, args.guidance_scale, args.eta, args.seed + 1)
    logits, feats = classifier_outputs(gen, clf)
    hist = class_histogram(logits)
    res["generic"] = {
        "n": args.n_generic, "guidance_scale": args.guidance_scale, "eta": args.eta,
        "class_histogram": hist.tolist(), "entropy": histogram_entropy(hist), "log10": float(np.log(10)),
        "tv_to_uniform": total_variation(hist, np.ones(10)), "tv_noise_floor_uniform": tv_noise_floor(np.ones(10), args.n_generic)[0],
        "max_softmax_mean": float(torch.softmax(logits, -1).max(-1).values.mean()), "diversity": pairwise_diversity(feats[:1000]),
    }
    print(f"generic: hist {np.round(hist, 3).tolist()} entropy {res['generic']['entropy']:.4f} (log 10 = {np.log(10):.4f})", flush=True)
    if args.n_generic_eta0:
        g0 = sample(pipe, ["a handwritten digit"] * args.n_generic_eta0, args.steps, args.guidance_scale, 0.0, args.seed + 2)
        h0 = class_histogram(classifier_outputs(g0, clf)[0])
        res["generic_eta0"] = {"n": args.n_generic_eta0, "class_histogram": h0.tolist(), "entropy": histogram_entropy(h0)}
        print(f"generic eta=0: hist {np.round(h0, 3).tolist()} entropy {histogram_entropy(h0):.4f}", flush=True)

    # 4. distribution matching on the generic base sample
    with torch.no_grad():
        r = clf(gen)[0].numpy()
    y = logits.argmax(-1).numpy()
    n = len(y)
    half = n // 2
    res["distribution_matching"] = {"target_digits": args.target_digits, "n_base": n, "reward_mean": float(r.mean()), "rows": []}
    print(f"reward log p(y in {args.target_digits}|x) on base sample: mean {r.mean():.3f}, min {r.min():.3f}, max {r.max():.3f}")
    for beta in args.betas:
        t = ideal_target_histogram(y, r, beta, n_bootstrap=300, seed=0, min_ess=0)
        ta = ideal_target_histogram(y[:half], r[:half], beta, min_ess=0)
        tb = ideal_target_histogram(y[half:], r[half:], beta, min_ess=0)
        # split-half: TV between two independent estimates vs. what their error bars predict,
        # E[0.5 sum_c |d_c|] with d_c ~ N(0, se_a^2 + se_b^2)
        expected_split = float(0.5 * np.sqrt(2 / np.pi) * np.sqrt(ta.stderr ** 2 + tb.stderr ** 2).sum())
        in_s = float(t.hist[args.target_digits].sum())
        row = {
            "beta": beta, "ess": t.ess, "ess_fraction": t.ess_fraction, "max_weight": t.max_weight_fraction,
            "target_mass_on_S": in_s, "max_stderr_delta": float(t.stderr.max()), "max_stderr_bootstrap": float(t.bootstrap_stderr.max()),
            "target_tv_error": float(0.5 * np.sqrt(2 / np.pi) * t.stderr.sum()),
            "split_half_tv": total_variation(ta.hist, tb.hist), "split_half_tv_expected": expected_split,
            "tv_noise_floor_1000": tv_noise_floor(t.hist, 1000)[0], "hist": t.hist.tolist(),
        }
        res["distribution_matching"]["rows"].append(row)
        print(f"beta {beta:6g}: ESS {t.ess:8.1f} ({t.ess_fraction:.3f}) mass on S {in_s:.3f} max se delta {row['max_stderr_delta']:.4f} "
              f"boot {row['max_stderr_bootstrap']:.4f} target TV err {row['target_tv_error']:.4f} split-half TV {row['split_half_tv']:.4f} (expected {row['split_half_tv_expected']:.4f}) "
              f"floor@1000 {row['tv_noise_floor_1000']:.4f}", flush=True)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    if args.grid:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [class_imgs[np.arange(10) * args.per_digit + j] for j in range(4)] + [gen[10 * j:10 * j + 10] for j in range(4)]
        fig, axes = plt.subplots(8, 10, figsize=(6, 5))
        for i, row_imgs in enumerate(rows):
            for d in range(10):
                axes[i, d].imshow(row_imgs[d].permute(1, 2, 0).numpy())
                axes[i, d].axis("off")
        fig.suptitle(f"rows 1-4: 'a handwritten digit 0..9'; rows 5-8: 'a handwritten digit' (CFG {args.guidance_scale}, {args.steps} steps, eta {args.eta})", fontsize=6)
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.grid, dpi=80)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
