"""Error of bf16 rewards and reward gradients against float32, per converted scorer, at the real architectures.

    python benchmarks/reward_precision.py [--images 4] [--rewards aesthetic hpsv2 imagereward pickscore] [--width 1.0]

Each scorer (random weights: nothing can be downloaded here) scores ``--images`` smooth random 512 px images with their
prompts and back-propagates ``rewards.sum()`` to the pixels, three ways:
- ``fp32``: float32 weights, autocast off (what the trainers do);
- ``autocast``: float32 weights, ``score`` run under ``torch.autocast(dtype=torch.bfloat16)`` (matmuls in bf16);
- ``bf16``: weights cast to bf16, under the same autocast (half the weight memory).
(The scorers' ``forward`` turns autocast off and casts images to float32; ``score`` is called directly here.)
Printed per scorer and mode: the reward error relative to the spread of the float32 rewards over the images (what
ranking and advantages see) and to their mean magnitude, the gradients' relative L2 error and cosine (median over
images), time relative to fp32 (interleaved) and the peak memory growth of the call. ``--width 0.5`` halves every
transformer width (faster smoke run). Random weights make the reward spread small and the errors pessimistic or
optimistic in ways trained weights may not be (trained CLIP towers have outlier activations), so these figures bound
nothing for a trained checkpoint; docs/memory.md says what was decided from them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from peak_memory import fix_malloc, peak_growth_mib

fix_malloc()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from reward_cost import _stand_in_tokenizer  # noqa: E402

from trl_gfn.rewards import AestheticScorer, HPSv2Scorer, ImageRewardScorer, PickScoreScorer  # noqa: E402
from trl_gfn.rewards.aesthetic import CLIP_VIT_L14_VISION_CONFIG  # noqa: E402
from trl_gfn.rewards.clip_scorers import CLIP_VIT_H14_CONFIG  # noqa: E402

CLASSES = {"aesthetic": AestheticScorer, "hpsv2": HPSv2Scorer, "imagereward": ImageRewardScorer, "pickscore": PickScoreScorer}


def _narrow(cfg: dict, width: float) -> dict:
    out = copy.deepcopy(cfg)
    for key in ("hidden_size", "intermediate_size", "projection_dim"):
        if key in out:
            out[key] = max(64, int(out[key] * width) // 64 * 64)
    return out


def build(name: str, width: float):
    torch.manual_seed(0)
    if width == 1.0:
        model = CLASSES[name]()
    elif name == "aesthetic":
        vision = _narrow(CLIP_VIT_L14_VISION_CONFIG, width)
        model = AestheticScorer(vision_config=vision, head_hidden_dims=(vision["projection_dim"], 128, 64, 16))
    elif name in ("hpsv2", "pickscore"):
        cfg = copy.deepcopy(CLIP_VIT_H14_CONFIG)
        cfg["text_config"], cfg["vision_config"] = _narrow(cfg["text_config"], width), _narrow(cfg["vision_config"], width)
        cfg["projection_dim"] = cfg["vision_config"]["projection_dim"] = cfg["text_config"]["projection_dim"]
        model = CLASSES[name](clip_config=cfg)
    else:
        from trl_gfn.rewards.imagereward import BLIP_VIT_L16_VISION_CONFIG, IMAGEREWARD_TEXT_CONFIG

        vision = _narrow(BLIP_VIT_L16_VISION_CONFIG, width)
        text = _narrow(IMAGEREWARD_TEXT_CONFIG, width)
        text["encoder_hidden_size"] = vision["hidden_size"]
        model = ImageRewardScorer(vision_config=vision, text_config=text, head_hidden_dims=(text["hidden_size"], 128, 64, 16))
    if model.tokenizer_required:
        model.tokenizer = _stand_in_tokenizer(name)
    return model.eval()


def images(n: int) -> torch.Tensor:
    """Smooth random images in [0, 1] (low-frequency colour fields plus fine noise), 512 px."""
    g = torch.Generator().manual_seed(1)
    coarse = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(512, 512), mode="bicubic", align_corners=False)
    return (coarse + 0.05 * torch.randn(n, 3, 512, 512, generator=g)).clamp(0, 1)


def run(model, x, prompts, mode):
    """Rewards and pixel gradients; ``score`` is called directly because calling the module turns autocast off."""
    meta = [{} for _ in prompts]

    def fn():
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            rewards = model.score(xi, prompts, meta)
        (grad,) = torch.autograd.grad(rewards.float().sum(), xi)
        return rewards.detach().float(), grad.float()

    return fn


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rewards", nargs="+", default=list(CLASSES))
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = images(args.images)
    prompts = [f"a photograph of a {w} on a table, detailed" for w in ("cat", "dog", "teapot", "bicycle", "violin", "lamp")][: args.images]
    prompts += ["a landscape"] * (args.images - len(prompts))
    print(f"{args.images} images of 512 px, width x{args.width}, random weights, {args.threads} thread(s); errors against float32 "
          "(spread = std of the float32 rewards over the images)\n")
    print("| scorer | mode | max reward error / spread | max reward error / mean abs | gradient rel. L2 error (median) | "
          "gradient cosine (min) | time / fp32 | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.rewards:
        model = build(name, args.width)
        low = copy.deepcopy(model).to(torch.bfloat16)
        low._check_float32 = lambda: None  # the trainers refuse non-float32 scorers; measured here on purpose
        fns = {"fp32": run(model, x, prompts, "fp32"), "autocast": run(model, x, prompts, "autocast"), "bf16": run(low, x, prompts, "bf16")}
        results, memory, times = {}, {}, {m: [] for m in fns}
        for mode, fn in fns.items():
            fn()  # warm-up
            memory[mode], results[mode] = peak_growth_mib(fn)
        for _ in range(2):  # interleaved timing
            for mode, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[mode].append(time.perf_counter() - t0)
        r32, g32 = results["fp32"]
        spread = r32.std().item()
        for mode in ("autocast", "bf16"):
            r, g = results[mode]
            err = (r - r32).abs().max().item()
            rel = [((gi - g0).norm() / g0.norm()).item() for gi, g0 in zip(g, g32)]
            cos = [cosine(gi, g0) for gi, g0 in zip(g, g32)]
            ratio = statistics.median(a / b for a, b in zip(times[mode], times["fp32"]))
            print(f"| {name} | {mode} | {err / max(spread, 1e-30):.3g} | {err / r32.abs().mean().item():.2g} | {statistics.median(rel):.3g} | "
                  f"{min(cos):.5f} | {ratio:.2f} | {memory[mode]:.0f} (fp32 {memory['fp32']:.0f}) |", flush=True)
        del model, low, fns, results


if __name__ == "__main__":
    main()
