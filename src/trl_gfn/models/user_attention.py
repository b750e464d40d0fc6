"""Decoupled cross-attention on user tokens (PPD): added layers, trained with the LoRA, that let the UNet attend to e_u.

For every cross-attention layer (``attn2``) of the UNet, :class:`UserCrossAttention` holds new key / value / output projections
of user tokens and installs a processor (:class:`DecoupledUserAttnProcessor`) that computes

    out = Attn(q, K_text, V_text) [the layer's own processor, LoRA included] + W_o · Attn(q, W_k·u, W_v·u),

q the layer's own (LoRA) query. The user tokens u (T of them, the width of the text embeddings) come from the provider's
embedding e_u through :meth:`UserCrossAttention.tokens` and travel appended to the text embeddings (``encoder_hidden_states``
of length L + T; the processor splits them off at ``text_length``). Text-only embeddings (length L) skip the added branch:
that is the reference model, and a classifier-free-guidance branch without a user. W_o is zero-initialised and the
projections have no biases, so the policy starts as the reference and zero tokens contribute exactly nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's cross-attention modules (``...attn2``), by name, in module order."""
    return [(name, m) for name, m in unet.named_modules() if name.endswith("attn2") and getattr(m, "is_cross_attention", False)]


class DecoupledUserAttnProcessor:
    """Attention processor of one ``attn2`` layer: the layer's previous processor on the text tokens, plus the user branch.

    A plain object (not an ``nn.Module``): its layers belong to :class:`UserCrossAttention`, which the trainer optimises and saves.
    """

    def __init__(self, base, to_k: nn.Linear, to_v: nn.Linear, to_out: nn.Linear, text_length: int) -> None:
        self.base, self.to_k, self.to_v, self.to_out, self.text_length = base, to_k, to_v, to_out, int(text_length)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        user = None
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] > self.text_length:
            encoder_hidden_states, user = encoder_hidden_states[:, :self.text_length], encoder_hidden_states[:, self.text_length:]
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if user is None:
            return out
        if hidden_states.ndim != 3:
            raise ValueError("DecoupledUserAttnProcessor supports (batch, tokens, channels) hidden states (transformer blocks)")
        b, heads = hidden_states.shape[0], attn.heads
        q = attn.to_q(hidden_states)
        k, v = self.to_k(user.to(q.dtype)), self.to_v(user.to(q.dtype))
        d = q.shape[-1] // heads
        q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * d)
        return out + self.to_out(o).to(out.dtype)


class UserCrossAttention(ModelMixin, ConfigMixin):
    """The added layers of PPD: a projection of e_u to ``num_tokens`` user tokens and, per cross-attention layer, key / value /
    output projections of the decoupled branch (see the module docstring). ``save_pretrained`` / ``from_pretrained`` like any
    diffusers model; :meth:`install` attaches it to a UNet."""

    @register_to_config
    def __init__(self, embed_dim: int = 16, num_tokens: int = 4, cross_attention_dim: int = 768, layer_dims: tuple = (), text_length: int = 77) -> None:
        super().__init__()
        self.project = nn.Linear(embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.to_k = nn.ModuleList(nn.Linear(cross_attention_dim, d, bias=False) for d in layer_dims)
        self.to_v = nn.ModuleList(nn.Linear(cross_attention_dim, d, bias=False) for d in layer_dims)
        self.to_out = nn.ModuleList(nn.Linear(d, d, bias=False) for d in layer_dims)
        for layer in self.to_out:
            nn.init.zeros_(layer.weight)

    @classmethod
    def for_unet(cls, unet: nn.Module, embed_dim: int, num_tokens: int, text_length: int) -> "UserCrossAttention":
        """Layers sized for ``unet``'s cross-attention layers."""
        layers = cross_attention_layers(unet)
        if not layers:
            raise ValueError("the UNet has no cross-attention layers (attn2) to attach user tokens to")
        return cls(embed_dim=embed_dim, num_tokens=num_tokens, cross_attention_dim=int(unet.config.cross_attention_dim),
                   layer_dims=tuple(int(m.to_q.out_features if hasattr(m.to_q, "out_features") else m.inner_dim) for _, m in layers),
                   text_length=text_length)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """User tokens (B, num_tokens, cross_attention_dim) of embeddings e_u (B, embed_dim)."""
        c = self.config
        return self.norm(self.project(embeddings.float()).view(-1, c.num_tokens, c.cross_attention_dim))

    tokens = forward

    def install(self, unet: nn.Module) -> None:
        """Wrap the processor of every cross-attention layer of ``unet`` with a :class:`DecoupledUserAttnProcessor` (once)."""
        layers = cross_attention_layers(unet)
        if len(layers) != len(self.to_k):
            raise ValueError(f"user attention layers were built for {len(self.to_k)} cross-attention layers, the UNet has {len(layers)}")
        for i, (_, module) in enumerate(layers):
            base = module.processor.base if isinstance(module.processor, DecoupledUserAttnProcessor) else module.processor
            module.set_processor(DecoupledUserAttnProcessor(base, self.to_k[i], self.to_v[i], self.to_out[i], self.config.text_length))

    @staticmethod
    def uninstall(unet: nn.Module) -> None:
        """Restore the processors :meth:`install` wrapped."""
        for _, module in cross_attention_layers(unet):
            if isinstance(module.processor, DecoupledUserAttnProcessor):
                module.set_processor(module.processor.base)


__all__ = ["DecoupledUserAttnProcessor", "UserCrossAttention", "cross_attention_layers"]
