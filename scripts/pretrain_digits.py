#!/usr/bin/env python
"""Pretrain the bundled digits model: a tiny Stable-Diffusion-shaped text-to-image model on UCI digits.

Rebuild (CPU; 33 minutes on a shared, heavily loaded 2-core machine with 1 thread; seeded, and the logged
losses of repeated runs matched, but bit-identity of the weights across machines and torch versions is not
guaranteed)::

    python scripts/pretrain_digits.py --output_dir src/trl_gfn/assets/digits-sd

Stages, all seeded:

1. data: the 1,797 UCI handwritten digits that scikit-learn ships (8x8, 17 grey levels), split
   80/20 stratified with ``seed`` (the same split as ``scripts/train_digit_classifier.py``); only
   the training split is used here. Each 8x8 image is scaled to [0, 1], bilinearly upsampled to
   16x16 and replicated to 3 channels (white ink on black, as in the source data).
2. a tiny ``AutoencoderKL`` (16x16x3 pixels <-> 4x8x8 latents), trained on reconstruction + a small
   KL term; its ``scaling_factor`` is set to 1 / std of the training latents.
3. a tiny ``UNet2DConditionModel`` on the 4x8x8 latents and a tiny ``CLIPTextModel`` trained jointly
   with the epsilon-prediction loss under the DDIM/DDPM schedule saved with the pipeline, with
   condition dropout: ``p_empty`` of the prompts are "" (for classifier-free guidance) and
   ``p_generic`` are the generic "a handwritten digit"; the rest name the class
   ("a handwritten digit 3"). An EMA of the weights is what gets saved.
4. the result is written as a standard ``StableDiffusionPipeline`` directory (no safety checker),
   plus ``training_log.txt`` (every logged figure, the command and the wall time).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from trl_gfn.data.uci_digits import load_digit_images  # noqa: E402  (also imported from here by train_digit_classifier.py)

GENERIC_PROMPT = "a handwritten digit"
PROMPT_TEMPLATE = "a handwritten digit {}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="src/trl_gfn/assets/digits-sd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test_fraction", type=float, default=0.2)
    p.add_argument("--vae_steps", type=int, default=600)
    p.add_argument("--vae_batch_size", type=int, default=64)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--vae_kl_weight", type=float, default=1e-4)
    p.add_argument("--unet_steps", type=int, default=2500)
    p.add_argument("--unet_batch_size", type=int, default=96)
    p.add_argument("--unet_lr", type=float, default=1.5e-3)
    p.add_argument("--warmup_steps", type=int, default=200)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--p_empty", type=float, default=0.15, help="fraction of empty prompts (classifier-free guidance)")
    p.add_argument("--p_generic", type=float, default=0.30, help="fraction of generic prompts 'a handwritten digit'")
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads; 1 = bit-reproducible and robust to a shared machine")
    return p.parse_args(argv)


class Logger:
    def __init__(self, path: Path):
        self.path = path
        self.lines: list[str] = []

    def __call__(self, msg: str):
        print(msg, flush=True)
        self.lines.append(msg)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def build_tokenizer(max_length: int = 8):
    """A CLIP BPE tokenizer whose vocabulary is the prompt words, single characters and digits.

    Whole words are single tokens: the merges spell each word out left to right.
    """
    from transformers import CLIPTokenizer

    words = ["a", "handwritten", "digit"] + [str(i) for i in range(10)]
    vocab: dict[str, int] = {}

    def add(tok):
        if tok not in vocab:
            vocab[tok] = len(vocab)

    add("<|startoftext|>")
    add("<|endoftext|>")
    for ch in string.ascii_lowercase + string.digits:
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    for w in words:
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        cur = symbols[0]
        for s in symbols[1:]:
            merges.append((cur, s))
            cur = cur + s
            add(cur)
    # transformers 5: pass the vocab dict and merge tuples (vocab_file=/merges_file= are ignored there)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token="<|endoftext|>")
    ids = tok("a handwritten digit 3").input_ids
    assert len(tok) == len(vocab), (len(tok), len(vocab))
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "3</w>", "<|endoftext|>"], ids
    return tok, vocab, merges


def save_tokenizer(tok, vocab, merges, path: Path):
    tok.save_pretrained(path)
    # also the classic vocab.json / merges.txt, for transformers 4.x readers
    (path / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")


def build_models(vocab_size: int, max_length: int):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=16, mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_length, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    # attention only at the 4x4 level (and the mid block): cheap on CPU; `attention_head_dim` is
    # the number of heads in diffusers' UNet2DConditionModel
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )
    return vae, text_encoder, unet, scheduler


def lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.95 + 0.05
    return f


def train_vae(vae, x_train, x_test, args, log):
    g = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, args.vae_steps))
    vae.train()
    t0 = time.time()
    for step in range(args.vae_steps):
        idx = torch.randint(0, len(x_train), (args.vae_batch_size,), generator=g)
        x = x_train[idx] * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = rec_loss + args.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            log(f"[vae] step {step:5d} rec_mse {rec_loss.item():.5f} kl/elem {kl.item():.3f} lr {sched.get_last_lr()[0]:.2e} t {time.time() - t0:.0f}s")
    vae.eval()
    with torch.no_grad():
        def rec_err(x):
            rec = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample
            return F.mse_loss(((rec + 1) / 2).clamp(0, 1), x).item()
        tr, te = rec_err(x_train), rec_err(x_test)
        lat = vae.encode(x_train * 2 - 1).latent_dist.sample(generator=g)
        std = lat.std().item()
    log(f"[vae] done in {time.time() - t0:.0f}s: reconstruction MSE in [0,1] pixels, train {tr:.5f} / held-out {te:.5f}; latent mean {lat.mean().item():.3f} std {std:.3f}")
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"[vae] scaling_factor = {1.0 / std:.5f}")
    return vae


@torch.no_grad()
def ema_update(ema_params, params, decay):
    for e, p in zip(ema_params, params):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def train_unet(vae, text_encoder, unet, scheduler, tokenizer, x_train, y_train, args, log):
    g = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        post = vae.encode(x_train * 2 - 1).latent_dist
        lat_mean, lat_std = post.mean.clone(), post.std.clone()
    sf = vae.config.scaling_factor
    prompts = [PROMPT_TEMPLATE.format(d) for d in range(10)] + [GENERIC_PROMPT, ""]
    tok_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    alphas_cumprod = scheduler.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup_steps, args.unet_steps))
    unet.train()
    text_encoder.train()
    t0, running = time.time(), []
    for step in range(args.unet_steps):
        b = args.unet_batch_size
        idx = torch.randint(0, len(x_train), (b,), generator=g)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * sf
        u = torch.rand(b, generator=g)
        prompt_idx = y_train[idx].clone()
        prompt_idx[u < args.p_empty + args.p_generic] = 10
        prompt_idx[u < args.p_empty] = 11
        enc = text_encoder(tok_ids[prompt_idx])[0]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        ac = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
        pred = unet(noisy, t, enc).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update(ema_params, params, min(args.ema_decay, (1 + step) / (10 + step)))
        running.append(loss.item())
        if step % args.log_every == 0 or step == args.unet_steps - 1:
            el = time.time() - t0
            log(f"[unet] step {step:5d} loss(avg last {len(running)}) {np.mean(running):.4f} lr {sched.get_last_lr()[0]:.2e} t {el:.0f}s ({el / (step + 1):.3f}s/step)")
            running = []
    log(f"[unet] done in {time.time() - t0:.0f}s")
    return ema_unet.eval(), ema_te.eval()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "training_log.txt")
    import diffusers
    import transformers
    log(f"command: python {' '.join(sys.argv)}")
    log(f"args: {json.dumps(vars(args))}")
    log(f"versions: torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    t_start = time.time()
    x_train, y_train, x_test, y_test = load_digit_images(args.seed, args.test_fraction)
    log(f"data: train {tuple(x_train.shape)}, held-out {tuple(x_test.shape)} (held-out split unused here except for VAE reconstruction)")
    tokenizer, vocab, merges = build_tokenizer()
    vae, text_encoder, unet, scheduler = build_models(len(tokenizer), tokenizer.model_max_length)
    for name, m in [("vae", vae), ("text_encoder", text_encoder), ("unet", unet)]:
        log(f"params {name}: {sum(p.numel() for p in m.parameters()):,}")
    vae = train_vae(vae, x_train, x_test, args, log).requires_grad_(False)
    unet, text_encoder = train_unet(vae, text_encoder, unet, scheduler, tokenizer, x_train, y_train, args, log)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, vocab, merges, out / "tokenizer")
    log(f"saved pipeline to {out}; total wall time {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
