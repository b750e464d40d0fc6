#!/usr/bin/env python
"""Train the digit classifier behind ``DigitClassifierReward`` and the ``trl_gfn.evaluation`` metrics.

Rebuild (CPU, about a minute)::

    python scripts/train_digit_classifier.py --output_dir src/trl_gfn/assets/digit-classifier

Data: the UCI digits that scikit-learn ships, upsampled to 16x16 exactly as in
``scripts/pretrain_digits.py`` and split 80/20 stratified with the same seed (the diffusion model is
trained on the same training split, so the held-out accuracy is on digits neither model has seen).
Augmentation: random shifts of up to 1 pixel (16x16 grid), random contrast in [0.8, 1.0] and
Gaussian pixel noise (std 0.05) so the classifier tolerates the small artefacts of generated digits.
Writes ``config.json`` + ``model.safetensors`` (``DigitClassifier.save_pretrained``) and
``training_log.txt`` with the held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from pretrain_digits import Logger, load_digit_images, seed_everything  # noqa: E402

from trl_gfn.rewards.digits import DigitClassifier  # noqa: E402


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (b,), generator=g)
    dy = torch.randint(0, 3, (b,), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16] for i in range(b)])
    out = out * (0.8 + 0.2 * torch.rand(b, 1, 1, 1, generator=g))
    out = out + 0.05 * torch.randn(out.shape, generator=g)
    return out.clamp(0, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="src/trl_gfn/assets/digit-classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test_fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, default=16, help="channels of the first convolutions (default 16, the reward's)")
    p.add_argument("--feature_dim", type=int, default=64, help="penultimate features (default 64, the reward's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.output_dir)
    log = Logger(out / "training_log.txt")
    log(f"command: python {' '.join(sys.argv)}")
    log(f"args: {json.dumps(vars(args))}")
    x_tr, y_tr, x_te, y_te = load_digit_images(args.seed, args.test_fraction)
    log(f"data: train {len(y_tr)}, held-out {len(y_te)}")
    model = DigitClassifier(width=args.width, feature_dim=args.feature_dim)
    log(f"params: {sum(q.numel() for q in model.parameters()):,}; config {json.dumps(model._hub_mixin_config)}")
    steps_per_epoch = (len(y_tr) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed + 3)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=g)
        losses = []
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(x_tr[idx], g)), y_tr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            acc = (model(x_te).argmax(-1) == y_te).float().mean().item()
        log(f"epoch {epoch:3d} train loss {np.mean(losses):.4f} held-out acc {acc:.4f} t {time.time() - t0:.0f}s")
    model.eval()
    with torch.no_grad():
        pred = model(x_te).argmax(-1)
        train_acc = (model(x_tr).argmax(-1) == y_tr).float().mean().item()
    acc = (pred == y_te).float().mean().item()
    per_class = {int(c): round((pred[y_te == c] == c).float().mean().item(), 4) for c in range(10)}
    log(f"final: train acc {train_acc:.4f}, held-out acc {acc:.4f} ({int((pred == y_te).sum())}/{len(y_te)}); per-class held-out {json.dumps(per_class)}")
    model.save_pretrained(out)
    log(f"saved to {out}; wall time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
