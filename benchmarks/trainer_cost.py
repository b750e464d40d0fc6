"""Per-update wall time and peak memory of each trainer relative to Nabla-GFlowNet, on one pipeline and batch, in one run.

Every trainer runs with its config's defaults (since issue #14: Nabla-GFlowNet's memory_efficient_order and VAE
decoder checkpointing on for the reward-gradient trainers), on the same random Stable-Diffusion-shaped pipeline (``tiny_stable_diffusion`` with
16x16x4 latents and UNet widths 32/64; the cost does not depend on the weights), the same batch
(``--batch`` samples, one optimizer update per epoch: ``sample_batch_size = train_batch_size = batch``,
one sampling batch, no accumulation), ``--steps`` DDPM steps and CFG 5. Each method keeps its own defaults
otherwise (noted in the table), e.g. Nabla-GFlowNet trains int(K·0.1)+1 transitions per trajectory and
DDPO int(K·1.0) (TRL's default), or int(K·0.2) in the ``ddpo_f0.2`` row (the same number as Nabla-GFlowNet).

One update = one ``trainer.step`` (sampling + scoring + training; the direct-backprop trainers sample with
gradient inside their update). Each trainer is measured in a fresh subprocess: peak memory is the growth of
the process's maximum RSS over the first update (after construction), wall time the median of
``--repeats`` further updates. Time is expressed in units of one no-grad sampling pass of the
batch (``pipeline.sample``), timed alternately with the updates in the same process so that both see the same
machine load; the ratio to Nabla-GFlowNet is the ratio of these units. Only ratios are meant to be compared.

    python benchmarks/trainer_cost.py [--steps 10] [--batch 2] [--repeats 3] [--threads 1] [--only ddpo,draft_k1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = {
    # name: (trainer class, config class, config overrides, note)
    "nabla_gfn": ("NablaGFlowNetTrainer", "NablaGFlowNetConfig", dict(flow_block_out_channels=[32, 64], flow_attention_head_dim=8),
                  "f=0.1 (2 transitions), flow head 32/64, reverse term on"),
    "nabla_gfn_unordered": ("NablaGFlowNetTrainer", "NablaGFlowNetConfig", dict(flow_block_out_channels=[32, 64], flow_attention_head_dim=8,
                            memory_efficient_order=False, vae_gradient_checkpointing=False),
                            "as nabla_gfn, memory_efficient_order and VAE checkpointing off (the order before issue #14)"),
    "nabla_gfn_ckpt": ("NablaGFlowNetTrainer", "NablaGFlowNetConfig", dict(flow_block_out_channels=[32, 64], flow_attention_head_dim=8,
                       gradient_checkpointing=True), "as nabla_gfn, with whole-UNet-call checkpointing"),
    "nabla_gfn_noflow": ("NablaGFlowNetTrainer", "NablaGFlowNetConfig", dict(use_flow_head=False), "f=0.1, use_flow_head=False"),
    "ddpo": ("DDPOTrainer", "DDPOConfig", dict(), "f=1.0 (TRL default): K transitions"),
    "ddpo_f0.2": ("DDPOTrainer", "DDPOConfig", dict(train_timestep_fraction=0.2), "f=0.2: 2 transitions"),
    "draft_k1": ("DRaFTTrainer", "DRaFTConfig", dict(draft_k=1), "DRaFT-1, checkpointing on"),
    "draft_k5": ("DRaFTTrainer", "DRaFTConfig", dict(draft_k=5), "DRaFT-5, checkpointing on"),
    "draft_lv2": ("DRaFTTrainer", "DRaFTConfig", dict(draft_lv_copies=2), "DRaFT-LV n=2"),
    "draft_full": ("DRaFTTrainer", "DRaFTConfig", dict(draft_k=0), "all K steps, checkpointing on"),
    "draft_full_nockpt": ("DRaFTTrainer", "DRaFTConfig", dict(draft_k=0, gradient_checkpointing=False, vae_gradient_checkpointing=False),
                          "all K steps, no checkpointing"),
    "draft_full_trl": ("DRaFTTrainer", "DRaFTConfig", dict(draft_k=0, vae_gradient_checkpointing=False),
                       "all K steps, whole-UNet checkpointing only (TRL AlignProp's order)"),
    "alignprop": ("AlignPropTrainer", "AlignPropConfig", dict(), "random truncation in [0, K-1], checkpointing on"),
    "refl": ("ReFLTrainer", "ReFLConfig", dict(), "stop at tau in [0, 250]"),
}


def worker(name: str, steps: int, batch: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import trl_gfn.configs as configs
    import trl_gfn.trainers as trainers
    from trl_gfn.pipelines import DiffusionPipelineForRL
    from trl_gfn.testing import BrightnessReward, tiny_stable_diffusion

    trainer_name, config_name, overrides, _ = METHODS[name]
    kwargs = dict(sample_num_steps=steps, sample_batch_size=batch, sample_num_batches_per_epoch=1, train_batch_size=batch,
                  train_gradient_accumulation_steps=1, sample_guidance_scale=5.0, save_freq=0, log_image_freq=0,
                  logdir=tempfile.mkdtemp(), run_name=name, seed=0, lora_rank=8)
    kwargs.update(overrides)
    config = getattr(configs, config_name)(**kwargs)
    pipeline = DiffusionPipelineForRL(tiny_stable_diffusion(latent_size=16, width=32))
    trainer = getattr(trainers, trainer_name)(config, BrightnessReward(), pipeline, prompt_function=["a cat", "a dog"])

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    global_step = trainer.step(0, 0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    updates = global_step
    generators = [torch.Generator().manual_seed(i) for i in range(batch)]
    times, sample_times = [], []
    for r in range(repeats):  # alternate an update and a no-grad sampling pass: both see the same machine load
        t0 = time.perf_counter()
        global_step = trainer.step(r + 1, global_step)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pipeline.sample(["a cat"] * batch, trainer.schedule, guidance_scale=5.0, generators=generators)
        sample_times.append(time.perf_counter() - t0)
    return {"name": name, "seconds": statistics.median(times), "peak_mb": peak_kb / 1024, "updates_per_step": updates,
            "sample_seconds": statistics.median(sample_times), "units": statistics.median(t / u for t, u in zip(times, sample_times))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", type=str, default="", help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--worker", type=str, default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.steps, args.batch, args.repeats, args.threads)))
        return

    names = [n for n in (args.only.split(",") if args.only else METHODS) if n]
    if "nabla_gfn" not in names:
        names.insert(0, "nabla_gfn")
    # a fixed glibc mmap threshold: freed tensors go back to the kernel, so the peak RSS follows live tensors (peak_memory.py)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1", MALLOC_MMAP_THRESHOLD_="131072")
    results = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps), "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(lines[-1][len("RESULT "):])
        r = results[name]
        print(f"  measured {name}: {r['seconds']:.2f} s/update, peak +{r['peak_mb']:.0f} MB", file=sys.stderr)

    ref = results["nabla_gfn"]
    print(f"\nK={args.steps} DDPM steps, batch {args.batch}, CFG 5, 16x16x4 latents, UNet 32/64, {args.threads} thread(s). "
          "unit = one no-grad sampling pass of the batch, timed alternately with the updates in the same process "
          "(the time ratio to Nabla-GFlowNet is the ratio of these units, robust to a shared machine's changing load)\n")
    ddpo = results.get("ddpo")
    print("| trainer | setting | update time in sampling units | time vs Nabla-GFlowNet | s / update (raw) | peak memory growth (MB) | "
          "memory vs Nabla-GFlowNet | memory vs DDPO |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        vs_ddpo = f"{r['peak_mb'] / max(ddpo['peak_mb'], 1e-9):.2f}" if ddpo else "-"
        print(f"| {name} | {METHODS[name][3]} | {r['units']:.2f} | {r['units'] / ref['units']:.2f} | {r['seconds']:.2f} | "
              f"{r['peak_mb']:.0f} | {r['peak_mb'] / max(ref['peak_mb'], 1e-9):.2f} | {vs_ddpo} |")


if __name__ == "__main__":
    main()
