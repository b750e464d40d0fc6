"""What one trained Nabla-GFlowNet transition costs, in units of one guided UNet forward (no grad).

    python benchmarks/transition_cost.py            # SD1.5-shaped UNet at quarter width, 32x32 latents
    python benchmarks/transition_cost.py --quick    # tiny UNet, for a smoke run

Prints, for each kind of transition, the model evaluations it makes (UNet forwards, VAE decodes, reward
calls, flow-head calls; a CFG forward of both branches counts as one UNet forward) and the wall time of
`compute_loss` + backward divided by the time of one sampling-style UNet forward on the same batch, all
measured in one run (DESIGN §5 reports the official implementation at 9.6 / 16.8 units for an interior
step without / with the reverse term, 9.7 / 17.1 for the last step, DDPO at 3.15).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from trl_gfn import DiffusionPipelineForRL, NablaGFlowNetConfig, NablaGFlowNetTrainer, TransitionBatch
from trl_gfn.testing import BrightnessReward, tiny_stable_diffusion, tiny_tokenizer


def sd15_quarter_width(latent: int) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=latent, block_out_channels=(80, 160, 320, 320), layers_per_block=2,
                                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(32, 64, 128, 128), latent_channels=4, layers_per_block=1, norm_num_groups=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tok = tiny_tokenizer(model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
                                        num_attention_heads=12, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                                        pad_token_id=513))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                          clip_sample=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


class Counting:
    def __init__(self):
        self.counts = Counter()

    def wrap_forward(self, module, name):
        original = module.forward

        def forward(*a, **k):
            self.counts[name] += 1
            return original(*a, **k)

        module.forward = forward

    def wrap_method(self, obj, attr, name):
        original = getattr(obj, attr)

        def method(*a, **k):
            self.counts[name] += 1
            return original(*a, **k)

        setattr(obj, attr, method)


def timed(fn, reps):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--latent", type=int, default=32)
    args = parser.parse_args()
    pipe = tiny_stable_diffusion() if args.quick else sd15_quarter_width(args.latent)
    width = [8, 16] if args.quick else [64, 128, 256, 256]
    heads = 4 if args.quick else 8
    rows = []
    scenarios = [
        ("interior, reverse term (default)", dict(use_flow_head=True), 2),
        ("interior, no flow head / no reverse", dict(use_flow_head=False), 2),
        ("interior, reverse, Jacobian-free", dict(use_flow_head=True, jacobian_free_reward_gradient=True), 2),
        ("last (x_1 -> x_0), flow head", dict(use_flow_head=True), 9),
        ("last (x_1 -> x_0), no flow head", dict(use_flow_head=False), 9),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, opts, step in scenarios:
            config = NablaGFlowNetConfig(sample_num_steps=10, sample_batch_size=args.batch, sample_num_batches_per_epoch=1,
                                         train_batch_size=args.batch, logdir=tmp, flow_block_out_channels=width, flow_attention_head_dim=heads,
                                         reward_scale=1e3, unet_reg_scale=1.0, save_freq=0, log_image_freq=0, **opts)
            trainer = NablaGFlowNetTrainer(config, BrightnessReward(), DiffusionPipelineForRL(pipe), prompt_function=["a cat"])
            samples = trainer.sample_epoch(0)
            batch = TransitionBatch.from_trajectories(samples, torch.full((args.batch,), step))
            p = trainer.pipeline
            x, emb = samples.latents[:, 0], samples.prompt_embeds
            a = trainer.schedule.alphas_cumprod[0].float()

            def unit():  # one guided UNet forward without grad, as in sampling
                with torch.no_grad():
                    p.guided_epsilon(p.unet, x, trainer.schedule.timesteps[:1].repeat(len(x)), emb, samples.negative_prompt_embeds,
                                     config.sample_guidance_scale, a, "epsilon")

            unit()
            counter = Counting()
            counter.wrap_forward(trainer.pipeline.unet, "unet")
            counter.wrap_method(trainer.pipeline, "decode", "vae_decode")
            counter.wrap_forward(trainer.reward_fn, "reward")
            if trainer.flow_head is not None:
                counter.wrap_forward(trainer.flow_head, "flow_head")

            def train_step():
                loss, _ = trainer.compute_loss(batch)
                loss.backward()
                trainer.optimizer.zero_grad(set_to_none=True)

            train_step()
            counts = dict(counter.counts)
            ratios = []
            for _ in range(args.reps):  # alternate: the unit and the step see the same machine load
                unit_seconds = timed(unit, 2)
                ratios.append(timed(train_step, 1) / unit_seconds)
            rows.append((label, counts, statistics.median(ratios), unit_seconds))
            del trainer
    print(f"unit = one guided (CFG) UNet forward without grad, batch {args.batch} (last measured: {rows[-1][3] * 1000:.1f} ms);"
          " each ratio is the median over repetitions of (step time / unit time) timed alternately")
    print(f"{'transition':40s} {'UNet fwd':>8s} {'VAE dec':>8s} {'reward':>7s} {'flow':>5s} {'units':>7s}")
    for label, counts, units, _ in rows:
        calls = {k: v for k, v in counts.items()}
        print(f"{label:40s} {calls.get('unet', 0):8d} {calls.get('vae_decode', 0):8d} {calls.get('reward', 0):7d} "
              f"{calls.get('flow_head', 0):5d} {units:7.2f}")


if __name__ == "__main__":
    main()
