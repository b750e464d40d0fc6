"""``mixed_precision="bf16"`` against float32 for one Nabla-GFlowNet transition: loss terms, parameter gradients, time, memory.

    python benchmarks/mixed_precision.py [--reps 2] [--latent 32]

Two trainers on the same SD1.5-shaped quarter-width model (transition_cost.py's, same weights), one with
``mixed_precision="no"`` and one with ``"bf16"`` (frozen UNet, VAE and text encoder in bf16 under autocast; LoRA, flow head
and the reward model in float32; the ∇-DB residual from the noise difference), with the same LoRA and flow-head weights
(moved off their initialisation) train on the same float32-sampled transitions. Printed per transition: each loss term's
relative error, the relative L2 error and cosine of the LoRA and flow-head gradients, time (interleaved, bf16 / fp32) and
peak memory growth. CPU bf16 here; GPU kernels round differently (and run bf16 much faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from peak_memory import fix_malloc, peak_growth_mib

fix_malloc()

import torch  # noqa: E402
from transition_cost import quarter_width_aesthetic, sd15_quarter_width  # noqa: E402

from trl_gfn import DiffusionPipelineForRL, NablaGFlowNetConfig, NablaGFlowNetTrainer, TransitionBatch  # noqa: E402
from trl_gfn.testing import reset_accelerate_state  # noqa: E402

K = 10
TERMS = ("loss_forward", "loss_reverse", "loss_terminal", "loss_reg")


def trainer(precision: str, latent: int, tmp: str, unet_reg_scale: float = 1e2) -> NablaGFlowNetTrainer:
    reset_accelerate_state()
    config = NablaGFlowNetConfig(sample_num_steps=K, sample_batch_size=1, sample_num_batches_per_epoch=1, train_batch_size=1, logdir=tmp,
                                 save_freq=0, log_image_freq=0, reward_scale=1e3, unet_reg_scale=unet_reg_scale, mixed_precision=precision)
    tr = NablaGFlowNetTrainer(config, quarter_width_aesthetic(), DiffusionPipelineForRL(sd15_quarter_width(latent)), prompt_function=["a cat"])
    torch.manual_seed(7)
    for p in tr.pipeline.lora_parameters():
        torch.nn.init.normal_(p, std=0.02)
    torch.nn.init.normal_(tr.flow_head.unet.conv_out.weight, std=0.02)
    return tr


def step(tr: NablaGFlowNetTrainer, batch: TransitionBatch):
    def fn():
        loss, terms = tr.compute_loss(batch)
        loss.backward()
        grads = {g["name"]: torch.cat([p.grad.flatten().clone() for p in g["params"]]) for g in tr.optimizer.param_groups}
        tr.optimizer.zero_grad(set_to_none=True)
        return {k: terms[k].item() for k in TERMS}, grads

    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--unet_reg_scale", type=float, default=1e2, help="λ of both trainers (0 isolates the ∇-DB terms)")
    parser.add_argument("--samples_from", choices=["fp32", "bf16"], default="fp32",
                        help="which trainer samples the transitions (and so records ε̂_old for the regulariser)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, bf16 = (trainer(p, args.latent, tmp + d, args.unet_reg_scale) for p, d in (("no", "/a"), ("bf16", "/b")))
        samples = (fp32 if args.samples_from == "fp32" else bf16).sample_epoch(0)
        print(f"one transition, batch 1, SD1.5-shaped UNet at quarter width, {args.latent}x{args.latent}x4 latents, K = {K}, CFG 5, "
              f"Nabla-GFlowNet defaults (flow head, reverse term), λ = {args.unet_reg_scale:g}, transitions sampled by the {args.samples_from} "
              "trainer, 1 thread; errors of bf16 against float32\n")
        print("| transition | " + " | ".join(f"{k} rel. error" for k in TERMS) + " | LoRA grad rel. L2 error (cosine) | "
              "flow-head grad rel. L2 error (cosine) | time bf16 / fp32 | peak memory fp32 → bf16 (MiB) |")
        print("|---|" + "---|" * (len(TERMS) + 4))
        for label, position in (("interior (step 2)", 2), ("last (x_1 -> x_0)", K - 1)):
            batch = TransitionBatch.from_trajectories(samples, torch.full((1,), position))
            fns = {"fp32": step(fp32, batch), "bf16": step(bf16, batch)}
            out, memory, times = {}, {}, {k: [] for k in fns}
            for name, fn in fns.items():
                fn()
                memory[name], out[name] = peak_growth_mib(fn)
            for _ in range(args.reps):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            (t32, g32), (t16, g16) = out["fp32"], out["bf16"]
            term_err = [abs(t16[k] - t32[k]) / abs(t32[k]) if t32[k] else float("nan") for k in TERMS]
            cells = []
            for group in ("lora", "flow_head"):
                a, b = g16[group].double(), g32[group].double()
                cells.append(f"{((a - b).norm() / b.norm()).item():.3g} ({(a @ b / (a.norm() * b.norm())).item():.4f})")
            ratio = statistics.median(a / b for a, b in zip(times["bf16"], times["fp32"]))
            print(f"| {label} | " + " | ".join(f"{e:.3g}" for e in term_err) + f" | {cells[0]} | {cells[1]} | {ratio:.2f} | "
                  f"{memory['fp32']:.0f} → {memory['bf16']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
