"""Weights and optimizer state of SD1.5, SDXL and SD3-medium at full size, on paper: every component is built from its
published configuration on PyTorch's ``meta`` device (no weights, no memory, no download) and its parameters counted.

    python benchmarks/full_size_weights.py

Prints, per family: parameters of the denoiser, VAE and text encoders; their bf16 memory; the LoRA (rank 8, the family's
default targets) with its float32 gradient and two AdamW moments; and the total that sits in GPU memory before any
activation. The activations of one trained transition are in docs/model_families.md (scaled from
``benchmarks/transition_cost.py --model sd15|sdxl|sd3``, measured at quarter width).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

GIB = 1024**3
LORA_RANK = 8


def clip_l() -> torch.nn.Module:
    """CLIP ViT-L/14's text tower (SD1.5's encoder; SDXL's and SD3's first)."""
    return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                      num_attention_heads=12, max_position_embeddings=77, projection_dim=768))


def clip_g() -> torch.nn.Module:
    """OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's and SD3's second encoder)."""
    return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                      num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
                                                      hidden_act="gelu"))


def t5_xxl() -> torch.nn.Module:
    """T5 v1.1 XXL's encoder (SD3's third encoder)."""
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu"))


def vae(latent_channels: int = 4, **kwargs) -> torch.nn.Module:
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **kwargs)


def sd15() -> dict[str, torch.nn.Module]:
    return {"denoiser": UNet2DConditionModel(sample_size=64, cross_attention_dim=768), "vae": vae(),
            "text encoders": CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                          num_attention_heads=12, max_position_embeddings=77))}


def sdxl() -> dict[str, torch.nn.Module]:
    unet = UNet2DConditionModel(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
                                attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, cross_attention_dim=2048)
    return {"denoiser": unet, "vae": vae(), "text encoders": torch.nn.ModuleList([clip_l(), clip_g()])}


def sd3_medium(with_t5: bool = True) -> dict[str, torch.nn.Module]:
    transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                                        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                                        pos_embed_max_size=192)
    encoders = [clip_l(), clip_g()] + ([t5_xxl()] if with_t5 else [])
    return {"denoiser": transformer, "vae": vae(16, use_quant_conv=False, use_post_quant_conv=False),
            "text encoders": torch.nn.ModuleList(encoders)}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_parameters(denoiser: torch.nn.Module, targets=("to_q", "to_k", "to_v", "to_out.0"), rank: int = LORA_RANK) -> int:
    """Parameters of a rank-``rank`` LoRA on every ``Linear`` whose name ends with a target (r·(in + out) each)."""
    total = 0
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def main() -> list[dict]:
    rows = []
    families = [("SD1.5 (512 px)", sd15), ("SDXL base (1024 px)", sdxl), ("SD3 medium (1024 px)", sd3_medium),
                ("SD3 medium without T5 (1024 px)", lambda: sd3_medium(with_t5=False))]
    for label, build in families:
        with torch.device("meta"):
            parts = build()
        params = {k: count(m) for k, m in parts.items()}
        lora = lora_parameters(parts["denoiser"])
        frozen_gib = sum(params.values()) * 2 / GIB  # bf16
        trained_gib = lora * 16 / GIB  # float32 weight, gradient and two AdamW moments
        rows.append(dict(family=label, **{f"{k} (M)": v / 1e6 for k, v in params.items()}, lora_M=lora / 1e6, frozen_bf16_gib=frozen_gib,
                         lora_state_gib=trained_gib, total_gib=frozen_gib + trained_gib))
    print("| family | denoiser (M params) | VAE (M) | text encoders (M) | frozen weights, bf16 (GiB) | LoRA r8 (M params) | "
          "LoRA + grad + AdamW, fp32 (GiB) | total before activations (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['denoiser (M)']:.0f} | {r['vae (M)']:.1f} | {r['text encoders (M)']:.0f} | {r['frozen_bf16_gib']:.2f} | "
              f"{r['lora_M']:.2f} | {r['lora_state_gib']:.3f} | {r['total_gib']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
