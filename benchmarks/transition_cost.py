"""Peak memory and time of one trained transition (Nabla-GFlowNet, DDPO) or one reward-backprop update (DRaFT-K, ReFL),
all on one model and batch, in one interleaved run; ratios to DDPO.

    python benchmarks/transition_cost.py                 # SD1.5-shaped UNet at quarter width, 32x32x4 latents, batch 1
    python benchmarks/transition_cost.py --batch 2 --only nabla,ddpo
    python benchmarks/transition_cost.py --quick         # tiny models, a smoke run
    python benchmarks/transition_cost.py --model sd3     # SD3-shaped transformer at quarter width (also: --model sdxl)
    python benchmarks/transition_cost.py --model sdxl --defaults_only   # one row per trainer, its shipped defaults
    python benchmarks/transition_cost.py --scaling       # activation memory at 24x24 and 32x32 latents, SD1.5 estimate

Model: the UNet has SD1.5's layout at quarter width (34 M parameters), the VAE SD's decoder at quarter width, the text
encoder one CLIP layer; the reward is the aesthetic scorer's architecture (CLIP ViT-L/14 vision tower + MLP) at quarter
width (``--reward brightness`` for a free reward). fp32, LoRA r8, CFG 5, 10 DDPM steps, random weights (costs do not
depend on them). ``--model sdxl``: SDXL's UNet layout (3 levels, 1/2/10 transformer layers, size conditioning) at quarter
width, two one-layer CLIP encoders; ``--model sd3``: SD3 medium's transformer (24 joint blocks, patch 2, 16 latent
channels) at quarter width (384 = 6 heads x 64), CLIP-L/G and T5 at quarter width with one layer each, 256 T5 tokens,
its flow sampler at noise level 0.7 (``sampler="auto"``). The SDXL and SD3 rows have not been measured (only smoke-run
with ``--quick``).

Each row runs, on the same sampled trajectories: for Nabla-GFlowNet and DDPO ``compute_loss`` + backward of one
transition batch (interior = step 2 of 10, last = x_1 -> x_0); for DRaFT-K / ReFL one micro-batch of
``generate_with_grad`` + reward + backward (sampling included). Columns:
- memory: growth of the process's peak resident set over the block (peak_memory.py; the models and samples are already
  loaded), in MiB; independent of the machine's load;
- units: wall time of the block / wall time of one guided UNet forward without grad on the batch, the two timed
  alternately, median over ``--reps`` (robust to a shared machine's load; absolute seconds are not);
- model calls made by the block (a CFG forward of both branches is one UNet call).
Checkpointing settings: ``-`` none (Nabla-GFlowNet's default ``memory_efficient_order=True`` ordering on), ``unordered``
the order before that option (``memory_efficient_order=False``), ``U`` whole-UNet-call checkpointing
(``gradient_checkpointing``), ``V`` VAE decoder checkpointing (``vae_gradient_checkpointing``), ``blocks`` diffusers' own
block-level UNet checkpointing (what trl-gfn used before; TRL's AlignProp checkpointed the whole UNet call, i.e. ``U``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections import Counter

from peak_memory import fix_malloc, peak_growth_mib

fix_malloc()

import torch  # noqa: E402
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,  # noqa: E402
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel  # noqa: E402

import trl_gfn  # noqa: E402
from trl_gfn import DiffusionPipelineForRL, TransitionBatch  # noqa: E402
from trl_gfn.rewards import AestheticScorer  # noqa: E402
from trl_gfn.testing import (BrightnessReward, tiny_stable_diffusion, tiny_stable_diffusion_3, tiny_stable_diffusion_xl, tiny_t5_tokenizer,  # noqa: E402
                             tiny_tokenizer)

K = 10
SCALING_LATENTS = (24, 32)
_OFF = dict(gradient_checkpointing=False, vae_gradient_checkpointing=False)
CKPT = {"-": _OFF, "U": {**_OFF, "gradient_checkpointing": True}, "V": {**_OFF, "vae_gradient_checkpointing": True},
        "UV": dict(gradient_checkpointing=True, vae_gradient_checkpointing=True), "blocks": _OFF,
        "unordered": dict(_OFF, memory_efficient_order=False)}

# Nabla-GFlowNet rows: (name, config overrides, step, checkpointing settings); "unordered" = the order before
# memory_efficient_order (the guess's UNet graph alive while the VAE and reward are differentiated)
NABLA = [
    ("nabla interior, default (flow head, reverse)", {}, 2, ("unordered", "-", "V", "U", "UV")),
    ("nabla last, default", {}, K - 1, ("unordered", "-", "UV")),
    ("nabla interior, paper loss", dict(paper=True), 2, ("unordered", "-", "UV")),
    ("nabla interior, no flow head", dict(use_flow_head=False), 2, ("unordered", "-", "UV")),
    ("nabla interior, Jacobian-free", dict(jacobian_free_reward_gradient=True), 2, ("-", "UV")),
]
BACKPROP = [("draft-1", dict(draft_k=1)), ("draft-5", dict(draft_k=5)), (f"draft-all ({K})", dict(draft_k=0))]


#: each trainer's shipped defaults only (``--defaults_only``): DDPO without checkpointing, Nabla-GFlowNet with its
#: memory ordering and the VAE decoder checkpointed (interior and last transition), DRaFT-1 with UNet and VAE checkpointed,
#: ReFL with the VAE decoder checkpointed
DEFAULT_ROWS = [("ddpo", "ddpo", "DDPOConfig", {}, 2, "-"),
                ("nabla interior, default (flow head, reverse)", "nabla", "NablaGFlowNetConfig", {}, 2, "V"),
                ("nabla last, default", "nabla", "NablaGFlowNetConfig", {}, K - 1, "V"),
                ("draft-1", "backprop", "DRaFTConfig", dict(draft_k=1), None, "UV"),
                ("refl", "backprop", "ReFLConfig", {}, None, "V")]


def rows_for(groups: set[str], defaults_only: bool = False) -> list[tuple]:
    if defaults_only:
        return list(DEFAULT_ROWS)
    rows = []
    if "ddpo" in groups:
        for ck in ("-", "U"):
            rows.append(("ddpo", "ddpo", "DDPOConfig", {}, 2, ck))
    if "nabla" in groups:
        for name, opts, step, settings in NABLA:
            for ck in settings:
                rows.append((name, "nabla", "NablaGFlowNetConfig", opts, step, ck))
    if "draft" in groups:
        for name, opts in BACKPROP:
            for ck in ("blocks", "U", "UV"):
                rows.append((name, "backprop", "DRaFTConfig", opts, None, ck))
    if "refl" in groups:
        for ck in ("-", "UV"):
            rows.append(("refl", "backprop", "ReFLConfig", {}, None, ck))
    return rows


def sd15_quarter_width(latent: int) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=latent, block_out_channels=(80, 160, 320, 320), layers_per_block=2,
                                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(32, 64, 128, 128), latent_channels=4, layers_per_block=2, norm_num_groups=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tok = tiny_tokenizer(model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
                                        num_attention_heads=12, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                                        pad_token_id=513))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                          clip_sample=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _quarter_width_vae(latent_channels: int = 4, **kwargs) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32, 64, 128, 128), latent_channels=latent_channels, layers_per_block=2, norm_num_groups=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **kwargs)


def _clip(hidden: int, projection: int | None = None, max_length: int = 77):
    tok = tiny_tokenizer(model_max_length=max_length)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1, num_attention_heads=hidden // 64,
                            max_position_embeddings=max_length, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                            projection_dim=projection or hidden)
    return tok, (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config))


def sdxl_quarter_width(latent: int) -> StableDiffusionXLPipeline:
    """SDXL base's UNet layout at quarter width: (80, 160, 320) channels, 1/2/10 transformer layers, head dim 16, cross-attention
    512 (= 192 + 320, the two encoders' quarter widths), size conditioning (6 x 64 + 320 pooled); SDXL's VAE layout at quarter width."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=latent, block_out_channels=(80, 160, 320), layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
                                attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=64, projection_class_embeddings_input_dim=6 * 64 + 320, cross_attention_dim=512,
                                norm_num_groups=16)
    tok, text = _clip(192)
    tok2, text2 = _clip(320, projection=320)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=_quarter_width_vae(scaling_factor=0.13025), text_encoder=text, text_encoder_2=text2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched, add_watermarker=False)


def sd3_quarter_width(latent: int) -> StableDiffusion3Pipeline:
    """SD3 medium's transformer at quarter width: 24 joint blocks of 6 heads x 64 (384), patch 2, 16 latent channels, joint
    attention 1024 (T5's quarter width), pooled projections 512 (= 192 + 320); CLIP-L/G and T5 one layer each; SD3's VAE
    (16 channels, scaling and shift factors) at quarter width; its FlowMatchEulerDiscreteScheduler (shift 3)."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                                        num_attention_heads=6, joint_attention_dim=1024, caption_projection_dim=384, pooled_projection_dim=512,
                                        pos_embed_max_size=96)
    tok, text = _clip(192, projection=192)
    tok2, text2 = _clip(320, projection=320)
    tok3 = tiny_t5_tokenizer(model_max_length=256)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=1024, d_kv=64, d_ff=2560, num_layers=1, num_heads=16, decoder_start_token_id=0))
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_quarter_width_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                                                           use_post_quant_conv=False),
                                    text_encoder=text, tokenizer=tok, text_encoder_2=text2, tokenizer_2=tok2, text_encoder_3=t5, tokenizer_3=tok3)


MODELS = {"sd15": (sd15_quarter_width, lambda: tiny_stable_diffusion(latent_size=16, width=32), "SD1.5-shaped UNet", 4),
          "sdxl": (sdxl_quarter_width, lambda: tiny_stable_diffusion_xl(latent_size=16, width=32), "SDXL-shaped UNet", 4),
          "sd3": (sd3_quarter_width, lambda: tiny_stable_diffusion_3(latent_size=16), "SD3-shaped transformer", 16)}


def quarter_width_aesthetic() -> AestheticScorer:
    """The aesthetic scorer's architecture (CLIP ViT-L/14 vision tower, 24 layers, 224 px) at quarter width."""
    torch.manual_seed(1)
    return AestheticScorer(vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=4,
                                              image_size=224, patch_size=14, projection_dim=192, hidden_act="quick_gelu"),
                           head_hidden_dims=(256, 128, 64, 16))


class Counting:
    """Counts calls of model forwards (wrapping ``forward`` of the instances)."""

    def __init__(self):
        self.counts = Counter()
        self._restore = []

    def wrap(self, obj, attr, name):
        original = getattr(obj, attr)

        def method(*a, **k):
            self.counts[name] += 1
            return original(*a, **k)

        setattr(obj, attr, method)
        self._restore.append((obj, attr, original))

    def undo(self):
        for obj, attr, original in reversed(self._restore):
            setattr(obj, attr, original)


def build(args, pipe, config_name: str, opts: dict, ck: str, tmp: str):
    opts = dict(opts)
    paper = opts.pop("paper", False)
    common = dict(sample_num_steps=K, sample_batch_size=args.batch, sample_num_batches_per_epoch=1, train_batch_size=args.batch, logdir=tmp,
                  save_freq=0, log_image_freq=0, sample_guidance_scale=5.0, lora_rank=8, **CKPT[ck], **opts)
    if config_name == "NablaGFlowNetConfig":
        width = [8, 16] if args.quick else [64, 128, 256, 256]
        common.update(flow_block_out_channels=width, flow_attention_head_dim=4 if args.quick else 8, reward_scale=1e3, unet_reg_scale=1.0)
    config_class = getattr(trl_gfn, config_name)
    config = config_class.paper(**common) if paper else config_class(**common)
    trainer_class = getattr(trl_gfn, config_name.replace("Config", "Trainer"))
    reward = BrightnessReward() if args.reward == "brightness" else quarter_width_aesthetic()
    trainer = trainer_class(config, reward, DiffusionPipelineForRL(pipe), prompt_function=["a cat", "a dog"])
    if ck == "blocks":  # what trl-gfn did before: diffusers' own checkpointing inside the UNet (keeps the attention layers)
        trainer.pipeline.unet.enable_gradient_checkpointing()
        trainer.pipeline.unet.train()
    else:
        trainer.pipeline.unet.disable_gradient_checkpointing()
        trainer.pipeline.unet.eval()
    return trainer


def measure(args, pipe, row, tmp, samples_cache):
    name, kind, config_name, opts, step, ck = row
    trainer = build(args, pipe, config_name, opts, ck, tmp)
    p = trainer.pipeline
    if kind == "backprop":
        prompts, meta = ["a cat"] * args.batch, [{}] * args.batch

        def block():
            out = trainer.generate_with_grad(prompts, meta, list(range(args.batch)), 0)
            rewards, _ = trainer.compute_rewards(out.images, out.prompts, out.prompt_metadata, need_grad=True)
            (-rewards.mean()).backward()
            trainer.optimizer.zero_grad(set_to_none=True)
    else:
        if "samples" not in samples_cache:
            samples_cache["samples"] = trainer.sample_epoch(0)
        samples = samples_cache["samples"]
        if kind == "ddpo":
            samples.extras["advantages"] = torch.linspace(-1, 1, len(samples))
        batch = TransitionBatch.from_trajectories(samples, torch.full((args.batch,), step))

        def block():
            loss, _ = trainer.compute_loss(batch)
            loss.backward()
            trainer.optimizer.zero_grad(set_to_none=True)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn((args.batch, *p.latent_shape), generator=gen)
    emb = p.encode_prompts(["a cat"] * args.batch)
    neg = p.encode_prompts([""]).expand(args.batch, -1, -1)
    t = trainer.schedule.timesteps[:1].repeat(args.batch)
    a = trainer.schedule.level(torch.zeros(args.batch, dtype=torch.long), like=x)

    def unit():  # one guided denoiser forward without grad, as in sampling
        with torch.no_grad():
            p.guided_epsilon(p.denoiser, x, t, emb, neg, 5.0, a, trainer.schedule.prediction_type)

    unit()
    block()  # warm-up (first-call allocations, lazy initialisations)
    counter = Counting()
    counter.wrap(p.unet, "forward", "unet")
    counter.wrap(p.vae, "decode", "vae")
    counter.wrap(trainer.reward_fn, "forward", "reward")
    if getattr(trainer, "flow_head", None) is not None:
        counter.wrap(trainer.flow_head, "forward", "flow")
    mib, _ = peak_growth_mib(block)
    counter.undo()
    ratios = []
    for _ in range(args.reps):  # alternate the unit and the block: both see the same machine load
        t0 = time.perf_counter()
        unit()
        u = time.perf_counter() - t0
        t0 = time.perf_counter()
        block()
        ratios.append((time.perf_counter() - t0) / u)
    p.unet.disable_gradient_checkpointing()
    p.unet.eval()
    return dict(counts=dict(counter.counts), mib=mib, units=statistics.median(ratios))


def scaling(args) -> None:
    """Peak memory of the graphs that dominate a transition, at two latent sizes, to extrapolate (docs/memory.md)."""
    from trl_gfn.models import FlowHead

    cols = ("policy graph (DDPO transition)", "UNet input-gradient graph", "VAE decode + reward gradient",
            "same, decoder checkpointed", "reward gradient alone", "flow head fwd+bwd (2 states)")
    print("| latent | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    measured: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for latent in SCALING_LATENTS:
            pipe = sd15_quarter_width(latent)
            trainer = build(args, pipe, "NablaGFlowNetConfig", dict(use_flow_head=False), "-", tmp)
            samples = trainer.sample_epoch(0)
            x = samples.latents[:, 3]
            p = trainer.pipeline
            t = trainer.schedule.timesteps[3:4].repeat(len(x))
            a = trainer.schedule.alphas_cumprod[3].view(1, 1, 1, 1)
            head = FlowHead(in_channels=4, block_out_channels=(64, 128, 256, 256), layers_per_block=1, cross_attention_dim=768,
                            attention_head_dim=8, sample_size=latent)

            def policy():
                eps = p.guided_epsilon(trainer.wrapped("unet"), x, t, samples.prompt_embeds, samples.negative_prompt_embeds, 5.0, a, "epsilon")
                eps.square().mean().backward()
                trainer.optimizer.zero_grad(set_to_none=True)

            def input_grad():
                xi = x.clone().requires_grad_(True)
                with p.reference_mode():
                    eps = p.guided_epsilon(p.unet, xi, t, samples.prompt_embeds, samples.negative_prompt_embeds, 5.0, a, "epsilon")
                    torch.autograd.grad(eps.square().sum(), xi)

            def vae_reward():
                trainer.reward_gradient(samples.latents[:, -1], samples.prompts, samples.prompt_metadata)

            def vae_reward_checkpointed():
                p.vae.enable_gradient_checkpointing()
                try:
                    vae_reward()
                finally:
                    p.vae.disable_gradient_checkpointing()

            images = samples.images

            def reward_only():
                trainer.reward_gradient(images, samples.prompts, samples.prompt_metadata, decode=False)

            def flow_head():
                two = torch.cat([x, x])
                head(two, torch.cat([t, t]), torch.cat([samples.prompt_embeds] * 2)).square().mean().backward()
                head.zero_grad(set_to_none=True)

            figures = []
            for fn in (policy, input_grad, vae_reward, vae_reward_checkpointed, reward_only, flow_head):
                fn()
                figures.append(peak_growth_mib(fn)[0])
            print(f"| {latent}x{latent} (images {8 * latent} px) | " + " | ".join(f"{m:.0f} MiB" for m in figures) + " |", flush=True)
            measured[latent] = dict(zip(("P", "U", "VR", "VcR", "R", "F"), figures))
            measured[latent]["V"] = measured[latent]["VR"] - measured[latent]["R"]  # the decoder's share
            measured[latent]["Vc"] = max(measured[latent]["VcR"] - measured[latent]["R"], 1.0)
            del trainer
    sd15_estimate(measured)


#: SD1.5 parameter counts (UNet 859.5 M, VAE 83.7 M, CLIP text encoder 123.1 M), the trained ones (LoRA r8 on
#: to_q/k/v/out.0: 1.59 M; flow head (64, 128, 256, 256): 25.2 M) and the scorers (aesthetic: CLIP ViT-L/14 vision
#: tower 303.5 M + MLP; HPSv2 / PickScore: CLIP ViT-H/14, 986 M with the text tower)
SD15_FROZEN, LORA, FLOW_HEAD, AESTHETIC, HPS = 1066.3e6, 1.59e6, 25.2e6, 304.3e6, 986.1e6
GIB = 1024**3


def sd15_estimate(m: dict) -> None:
    """A paper estimate of SD1.5's GPU memory at 512 px, bf16, LoRA, batch 1, per method (docs/memory.md).

    Activation graphs are taken from the quarter-width measurements at 32x32 latents and scaled: to 64x64 latents (512 px
    images) by the growth measured from 24x24 to 32x32, as a power of the area; by 4 for width (SD1.5's UNet and VAE are 4x wider than
    the benchmark's, the aesthetic scorer's CLIP 4x wider; the reward sees 224 px whatever the image size, so its graph
    does not grow with the area), and by 1/2 for bf16 (UNet and VAE; the flow head and the scorer stay float32).
    Weights: frozen UNet/VAE/text encoder in bf16, scorer in float32, trained tensors in float32 with their gradient
    and two AdamW moments (16 bytes per parameter). A peak is the largest set of graphs alive at once for each method's
    order of work (docs/memory.md); the CUDA context and allocator slack (typically 0.5-1.5 GiB) are not included.
    """
    small, big = SCALING_LATENTS

    def grown(key: str, width: float, precision: float) -> float:
        """The graph at 64x64 latents: the 32x32 figure times the growth measured from 24x24 to 32x32, extrapolated as a
        power of the area (64x64 is 4x the area of 32x32), times the width and precision factors, in GiB."""
        exponent = math.log(m[big][key] / m[small][key]) / math.log((big / small) ** 2)
        return m[big][key] * 4 ** exponent * width * precision / 1024

    P, U, F = grown("P", 4, 0.5), grown("U", 4, 0.5), grown("F", 1, 1.0)
    R = m[big]["R"] * 4 / 1024  # 224 px whatever the image size: the scorer's graph only grows with its width
    V, Vc = grown("V", 4, 0.5), grown("Vc", 4, 0.5)
    weights = SD15_FROZEN * 2 / GIB + AESTHETIC * 4 / GIB
    lora_state, flow_state = LORA * 16 / GIB, FLOW_HEAD * 16 / GIB
    rows = [
        ("DDPO (reward not differentiated)", weights + lora_state, P),
        ("Nabla-GFlowNet, default (ordered, VAE checkpointed)", weights + lora_state + flow_state, max(P, U, Vc + R, F)),
        ("Nabla-GFlowNet, ordered, VAE not checkpointed", weights + lora_state + flow_state, max(P, U, V + R, F)),
        ("Nabla-GFlowNet, before issue #14 (unordered)", weights + lora_state + flow_state, max(U + V + R, P + F)),
        ("DRaFT-K / AlignProp / ReFL, default (UNet and VAE checkpointed)", weights + lora_state, max(P, Vc + R)),
        ("DRaFT-K / AlignProp, TRL's order (UNet checkpointed only)", weights + lora_state, max(P, V + R)),
    ]
    print("\nEstimate for SD1.5 at 512 px, bf16, LoRA r8, batch 1, aesthetic scorer in float32 (GiB; scaled from the rows above):")
    print(f"graphs: policy {P:.2f}, UNet input-gradient {U:.2f}, VAE decoder {V:.2f} ({Vc:.2f} checkpointed), scorer {R:.2f}, "
          f"flow head {F:.2f}; weights {weights:.2f} (frozen bf16 {SD15_FROZEN * 2 / GIB:.2f} + scorer {AESTHETIC * 4 / GIB:.2f}); "
          f"HPSv2/PickScore instead of the aesthetic scorer: +{(HPS - AESTHETIC) * 4 / GIB:.2f}")
    print("| method | weights + optimizer state | activations at the peak | total |")
    print("|---|---|---|---|")
    for name, fixed, act in rows:
        print(f"| {name} | {fixed:.1f} | {act:.1f} | {fixed + act:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke run)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15", help="model shape at quarter width (sd15, sdxl, sd3)")
    parser.add_argument("--reward", choices=["aesthetic", "brightness"], default="aesthetic")
    parser.add_argument("--only", default="ddpo,nabla,draft,refl", help="comma-separated groups: ddpo, nabla, draft, refl")
    parser.add_argument("--scaling", action="store_true", help="measure the dominant graphs at two latent sizes instead")
    parser.add_argument("--defaults_only", action="store_true", help="one row per trainer, its shipped defaults (ignores --only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.scaling:
        scaling(args)
        return
    groups = set(args.only.split(","))
    groups.add("ddpo")  # the reference of the ratios
    full, tiny, label, channels = MODELS[args.model]
    pipe = tiny() if args.quick else full(args.latent)
    if args.quick:
        args.reward = "brightness"
    results = []
    samples_cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows_for(groups, args.defaults_only):
            results.append((row, measure(args, pipe, row, tmp, samples_cache)))
            r = results[-1][1]
            print(f"  measured {row[0]} [{row[5]}]: {r['mib']:.0f} MiB, {r['units']:.2f} units ({time.strftime('%H:%M:%S')})",
                  file=sys.stderr, flush=True)
    ddpo = {row[5]: r for row, r in results if row[1] == "ddpo"}
    print(f"\nbatch {args.batch}, {f'tiny {args.model} models' if args.quick else f'{label} at quarter width, {args.latent}x{args.latent}x{channels} latents'}, "
          f"reward {args.reward}, fp32, LoRA r8, CFG 5, K = {K} steps, 1 thread. Memory: growth of peak RSS over the loaded models and samples; "
          "units: time / one guided UNet forward without grad (timed alternately). Ratios to DDPO without checkpointing.\n")
    print("| row | checkpointing | peak memory (MiB) | memory / DDPO | units | units / DDPO | UNet | VAE dec | reward | flow head |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = ddpo["-"]
    for (name, _kind, _c, _o, _s, ck), r in results:
        c = r["counts"]
        print(f"| {name} | {ck} | {r['mib']:.0f} | {r['mib'] / max(base['mib'], 1e-9):.2f} | {r['units']:.2f} | "
              f"{r['units'] / base['units']:.2f} | {c.get('unet', 0)} | {c.get('vae', 0)} | {c.get('reward', 0)} | {c.get('flow', 0)} |")


if __name__ == "__main__":
    main()
