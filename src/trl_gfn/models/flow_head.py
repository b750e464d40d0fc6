"""The flow head g_φ: a small conditional UNet predicting the residual log-flow gradient ∇_x log F̃."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class FlowHead(ModelMixin, ConfigMixin):
    """Residual flow-gradient model g_φ(x, τ, c) of Nabla-GFlowNet.

    A small :class:`~diffusers.UNet2DConditionModel` (one layer per block, cross-attention on the
    prompt embedding) whose output convolution is zero-initialised, so that g ≡ 0 at the start and the
    ∇-DB target begins as the guessed gradient β·γ·∇r(x̂_0). It is its own Hub model:
    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` come from diffusers' ``ModelMixin``.

    Args:
        in_channels: latent channels of the diffusion model (4 for Stable Diffusion).
        block_out_channels: widths of the UNet blocks (the paper uses (64, 128, 256, 256)).
        layers_per_block: ResNet layers per block.
        cross_attention_dim: hidden size of the text encoder (768 for SD 1.x).
        attention_head_dim: width of each attention head.
        sample_size: latent resolution (informational; the UNet is resolution-agnostic).
        condition_on_prompt: if False, the prompt embedding is replaced by zeros (prompt-free rewards).
        zero_init: zero the output convolution so that g starts exactly at 0.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        block_out_channels: tuple[int, ...] = (64, 128, 256, 256),
        layers_per_block: int = 1,
        cross_attention_dim: int = 768,
        attention_head_dim: int = 8,
        sample_size: int = 64,
        condition_on_prompt: bool = True,
        zero_init: bool = True,
    ):
        super().__init__()
        depth = len(block_out_channels)
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            norm_num_groups=min(32, min(block_out_channels)),
        )
        if zero_init:
            torch.nn.init.zeros_(self.unet.conv_out.weight)
            torch.nn.init.zeros_(self.unet.conv_out.bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Return g_φ(sample, timestep, prompt) with the shape of ``sample`` (float32).

        ``encoder_hidden_states`` is a (B, L, D) tensor or a prompt ``Conditioning`` (SDXL), whose token states
        (``.embeds``) it attends to."""
        if not isinstance(encoder_hidden_states, torch.Tensor):
            encoder_hidden_states = encoder_hidden_states.embeds
        if not self.config.condition_on_prompt:
            encoder_hidden_states = torch.zeros_like(encoder_hidden_states)
        dtype = self.unet.conv_in.weight.dtype
        out = self.unet(sample.to(dtype), timestep, encoder_hidden_states.to(dtype)).sample
        return out.float()
