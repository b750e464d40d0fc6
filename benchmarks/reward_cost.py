"""Cost of each reward's forward + backward (to the pixels) at 512 px, in UNet-step units, measured in one run.

Unit: one classifier-free-guidance step of an SD1.5-sized ``UNet2DConditionModel`` (batch 2 = uncond +
cond, 64x64x4 latents, 77x768 text states, no grad): what one sampling step costs. Each reward scores
one 512x512 image in [0, 1] (including the differentiable resize to 224 px) and back-propagates
``rewards.sum()`` to the image, as the gradient-based trainers do. Full-size architectures with random
weights (no download is possible here; the cost does not depend on the weights).

    python benchmarks/reward_cost.py [--repeats 2] [--threads N]

Unit and reward are timed in interleaved pairs and the ratio is the median of the per-pair ratios, so that
load from other processes affects both alike; only the ratios are meant to be compared across machines.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build_unet_step():
    """An SD1.5-sized UNet and a closure running one CFG step (batch 2, no grad)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(  # Stable Diffusion 1.5 UNet configuration
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    ).eval()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=g)
    text = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500, 500])

    def step():
        with torch.no_grad():
            unet(latents, t, encoder_hidden_states=text).sample

    return step


def build_reward_step(name: str):
    """A full-size reward (random weights) and a closure running forward + backward to one 512 px image."""
    from trl_gfn.rewards import AestheticScorer, HPSv2Scorer, ImageRewardScorer, PickScoreScorer

    model = {"aesthetic": AestheticScorer, "hpsv2": HPSv2Scorer, "imagereward": ImageRewardScorer, "pickscore": PickScoreScorer}[name]()
    if model.tokenizer_required:
        model.tokenizer = _stand_in_tokenizer(name)
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    prompt = ["a photograph of an astronaut riding a horse on the moon, highly detailed"]

    def fwd_bwd():
        x = image.clone().requires_grad_(True)
        rewards, _ = model(x, prompt)
        rewards.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()

    return fwd_bwd


def _stand_in_tokenizer(name: str):
    """A callable producing token ids of the right length and vocabulary (the real tokenizer is not downloadable here).

    Only the token ids matter for cost; the stand-in emits BOS, a few ids, EOS, padding.
    """

    class StandIn:
        def __init__(self, bos, eos, pad, first, vocab):
            self.bos, self.eos, self.pad, self.first, self.vocab = bos, eos, pad, first, vocab

        def __len__(self):
            return self.vocab

        def __call__(self, prompts, padding, truncation, max_length, return_tensors):
            ids = torch.full((len(prompts), max_length), self.pad)
            mask = torch.zeros(len(prompts), max_length, dtype=torch.long)
            n = min(16, max_length - 2)
            ids[:, 0] = self.bos
            ids[:, 1 : 1 + n] = torch.arange(self.first, self.first + n)
            ids[:, 1 + n] = self.eos
            mask[:, : 2 + n] = 1
            return {"input_ids": ids, "attention_mask": mask}

    if name == "imagereward":
        return StandIn(101, 102, 0, 2000, 30524)
    return StandIn(49406, 49407, 49407, 320, 49408)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="(unit, reward) measurement pairs per reward")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rewards", nargs="+", default=["aesthetic", "hpsv2", "imagereward", "pickscore"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet_step = build_unet_step()
    unet_step()  # warm-up
    rows = []
    unit_times = []
    for name in args.rewards:
        reward_step = build_reward_step(name)
        reward_step()  # warm-up
        pairs = []
        for _ in range(args.repeats):
            # interleaved, so that load from other processes affects unit and reward alike
            u = _seconds(unet_step)
            r = _seconds(reward_step)
            pairs.append((u, r))
        unit_times += [u for u, _ in pairs]
        rows.append((name, statistics.median(r for _, r in pairs), statistics.median(r / u for u, r in pairs)))
        del reward_step
        gc.collect()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved (unit, reward) pairs per reward")
    print(f"unit = one CFG step of an SD1.5-sized UNet (batch 2, 64x64 latents, no grad): median {statistics.median(unit_times):.2f} s")
    print(f"{'reward (fwd+bwd, 1 image @512px)':<36} {'seconds':>8} {'units':>6}")
    for name, seconds, ratio in rows:
        print(f"{name:<36} {seconds:8.2f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
