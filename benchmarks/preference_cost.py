"""What one training update costs per preference pair, in UNet forwards: Diffusion-DPO vs Inversion-DPO.

Counts the latents that pass through the UNet (trl_gfn.evaluation.unet_calls.UNetCallCounter) during ``compute_loss`` and the
backward pass of one batch, on the bundled digits model and its bundled pairs, for the first use of the pairs (Inversion-DPO
inverts them: cold cache) and a later epoch (cached). A forward with gradient is followed by its backward (~2 forwards);
wall-clock ratios to one no-grad UNet forward of the same batch are printed too (same process, one thread).

    python benchmarks/preference_cost.py                       # N = 40 (the default), all steps trained, and N = 40 / 10 with 2 trained steps
    python benchmarks/preference_cost.py --pairs 8 --steps 40,10 --train_steps 0,2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


def main(argv=None) -> list[dict]:
    import torch

    from trl_gfn import DiffusionDPOConfig, DiffusionDPOTrainer, InversionDPOConfig, InversionDPOTrainer
    from trl_gfn.data.digits_preferences import load_digits_preferences, load_pipeline
    from trl_gfn.evaluation.unet_calls import UNetCallCounter
    from trl_gfn.testing import reset_accelerate_state

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=8, help="pairs in the measured batch")
    p.add_argument("--steps", default="40,10", help="inversion_num_steps values")
    p.add_argument("--train_steps", default="0,2", help="inversion_train_steps values (0: all N)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits_preferences("train").filter(lambda r: r["label_0"] in (0.0, 1.0)).select(range(args.pairs))
    common = dict(num_epochs=1, train_batch_size=args.pairs, logdir=tempfile.mkdtemp(prefix="pref_cost_"), save_freq=0)
    setups = [("dpo", DiffusionDPOTrainer, DiffusionDPOConfig(run_name="dpo", **common))]
    for n in [int(s) for s in args.steps.split(",") if s]:
        for k in [int(s) for s in args.train_steps.split(",") if s]:
            setups.append((f"inversion_dpo N={n} K={k or n}", InversionDPOTrainer,
                           InversionDPOConfig(run_name=f"inv{n}_{k}", inversion_num_steps=n, inversion_train_steps=k or None, **common)))
    rows = []
    unit = None
    for name, cls, config in setups:
        reset_accelerate_state()
        trainer = cls(config, load_pipeline(), data)
        pipe, idx = trainer.pipeline, list(range(args.pairs))
        batch = trainer.train_pairs.load(idx)
        if unit is None:  # one no-grad UNet forward of a batch of `pairs` latents, seconds
            x = torch.randn(args.pairs, *pipe.latent_shape)
            emb = pipe.encode_prompts(batch.captions)
            t = torch.full((args.pairs,), 500)
            with torch.no_grad():
                pipe.unet(x, t, encoder_hidden_states=emb)
                t0 = time.perf_counter()
                for _ in range(10):
                    pipe.unet(x, t, encoder_hidden_states=emb)
                unit = (time.perf_counter() - t0) / 10
        for epoch, label in ((0, "first use"), (1, "cached")):
            if name == "dpo" and epoch == 1:
                continue
            gens = trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], epoch)
            t0 = time.perf_counter()
            with UNetCallCounter(pipe.unet) as calls:
                loss, _ = trainer.compute_loss(batch, gens)
                loss.backward()
            seconds = time.perf_counter() - t0
            trainer.optimizer.zero_grad(set_to_none=True)
            row = {"method": name, "when": label if name != "dpo" else "every update", "grad_fwd_per_pair": calls.grad / args.pairs,
                   "nograd_fwd_per_pair": calls.no_grad / args.pairs,
                   "forward_equivalents_per_pair": (3 * calls.grad + calls.no_grad) / args.pairs,
                   "time_batch_units": seconds / unit}
            rows.append(row)
        trainer.accelerator.end_training()
    dpo = rows[0]["forward_equivalents_per_pair"]
    print(f"UNet forwards per preference pair and update ({args.pairs} pairs; grad forwards also pay a backward, ~2 forwards;"
          f" 'fwd-equivalents' = 3 x grad + no-grad; time in units of one no-grad UNet forward of the whole batch)")
    print("| method | when | forwards with grad | forwards without grad | fwd-equivalents | x Diffusion-DPO | time (batch-forward units) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['when']} | {r['grad_fwd_per_pair']:g} | {r['nograd_fwd_per_pair']:g} | {r['forward_equivalents_per_pair']:g} | "
              f"{r['forward_equivalents_per_pair'] / dpo:.1f} | {r['time_batch_units']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
