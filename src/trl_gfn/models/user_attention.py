"""Decoupled attention on user tokens (PPD): added layers, trained with the LoRA, that let the denoiser attend to e_u.

For every attention layer that reads the prompt — the cross-attention layers (``attn2``) of a UNet, the joint attention
(``attn`` of every ``JointTransformerBlock``) of SD3's transformer — :class:`UserCrossAttention` holds new key / value /
output projections of user tokens and installs a processor that adds a decoupled branch to the layer's output for the
image tokens:

    out_image = [the layer's own processor, LoRA included] + W_o · Attn(q_image, W_k·u, W_v·u),

q_image the layer's own (LoRA) query of the image tokens (with its ``norm_q`` when it has one). The user tokens u (T of
them) come from the provider's embedding e_u through :meth:`UserCrossAttention.tokens` and reach the processor by the
family's route (``DiffusionPipelineForRL.append_extra_tokens``):

- **UNet** (``layer_kind="cross_attention"``, :class:`DecoupledUserAttnProcessor`): appended to the text embeddings
  (``encoder_hidden_states`` of length L + T, tokens as wide as the text embeddings); the processor splits them off at
  ``text_length``. Text-only embeddings (length L) skip the branch.
- **SD3** (``layer_kind="joint_attention"``, :class:`JointUserAttnProcessor`): the transformer's ``encoder_hidden_states``
  go through its ``context_embedder``, so the tokens travel beside them instead, as ``joint_attention_kwargs={"extra_tokens":
  u}`` (diffusers hands those kwargs to every joint attention processor), tokens as wide as the transformer's context
  stream (``caption_projection_dim``). The context tokens' output is the base processor's, unchanged; a call without
  ``extra_tokens`` is exactly the base transformer.

No tokens is the reference model and the classifier-free-guidance branch without a user. W_o is zero-initialised and the
projections have no biases, so the policy starts as the reference and zero tokens contribute exactly nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

#: the kinds of layers the user branch attaches to
LAYER_KINDS = ("cross_attention", "joint_attention")


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's cross-attention modules (``...attn2``), by name, in module order."""
    return [(name, m) for name, m in unet.named_modules() if name.endswith("attn2") and getattr(m, "is_cross_attention", False)]


def joint_attention_layers(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The joint image-text attention modules (``attn`` of every ``JointTransformerBlock``) of an SD3 transformer, in order."""
    from diffusers.models.attention import JointTransformerBlock

    return [(f"{name}.attn", m.attn) for name, m in transformer.named_modules() if isinstance(m, JointTransformerBlock)]


def user_branch(attn, hidden_states: torch.Tensor, tokens: torch.Tensor, to_k: nn.Linear, to_v: nn.Linear, to_out: nn.Linear) -> torch.Tensor:
    """W_o · Attn(q, W_k·u, W_v·u) for the (B, N, C) ``hidden_states`` of layer ``attn`` (its query, heads and ``norm_q``)."""
    if hidden_states.ndim != 3:
        raise ValueError("the user attention branch supports (batch, tokens, channels) hidden states (transformer blocks)")
    b, heads = hidden_states.shape[0], attn.heads
    q = attn.to_q(hidden_states)
    k, v = to_k(tokens.to(q.dtype)), to_v(tokens.to(q.dtype))
    d = q.shape[-1] // heads
    q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * d)
    return to_out(o)


class DecoupledUserAttnProcessor:
    """Attention processor of one UNet ``attn2`` layer: the layer's previous processor on the text tokens, plus the user branch
    on the tokens after ``text_length``.

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
        return out + user_branch(attn, hidden_states, user, self.to_k, self.to_v, self.to_out).to(out.dtype)


class JointUserAttnProcessor:
    """Attention processor of one SD3 joint attention layer: the layer's previous processor (``JointAttnProcessor2_0``, LoRA
    included), plus the user branch on its image-token output when the call carries ``extra_tokens`` (B, T, D) (from the
    transformer's ``joint_attention_kwargs``). The context-token output is returned unchanged.

    ``extra_tokens`` is a named parameter because diffusers' ``Attention`` passes a processor only the keyword arguments its
    ``__call__`` declares. A plain object, like :class:`DecoupledUserAttnProcessor`.
    """

    def __init__(self, base, to_k: nn.Linear, to_v: nn.Linear, to_out: nn.Linear) -> None:
        self.base, self.to_k, self.to_v, self.to_out = base, to_k, to_v, to_out

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, extra_tokens=None, **kwargs):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if extra_tokens is None:
            return out
        image, context = out if isinstance(out, tuple) else (out, None)
        image = image + user_branch(attn, hidden_states, extra_tokens, self.to_k, self.to_v, self.to_out).to(image.dtype)
        return (image, context) if isinstance(out, tuple) else image


_PROCESSORS = {"cross_attention": DecoupledUserAttnProcessor, "joint_attention": JointUserAttnProcessor}
_LAYERS = {"cross_attention": cross_attention_layers, "joint_attention": joint_attention_layers}


class UserCrossAttention(ModelMixin, ConfigMixin):
    """The added layers of PPD: a projection of e_u to ``num_tokens`` user tokens and, per attention layer, key / value /
    output projections of the decoupled branch (see the module docstring). ``save_pretrained`` / ``from_pretrained`` like any
    diffusers model; :meth:`install` attaches it to its denoiser.

    Args:
        embed_dim: width of the user embedding e_u.
        num_tokens: T, user tokens per embedding.
        cross_attention_dim: width of the user tokens (the UNet's text embeddings; SD3's ``caption_projection_dim``).
        layer_dims: inner width of each attention layer the branch attaches to, in module order.
        text_length: L, text tokens before the appended user tokens (UNet layers only).
        layer_kind: ``"cross_attention"`` (UNet ``attn2`` layers, tokens appended to the text) or ``"joint_attention"``
            (SD3's joint attention, tokens passed as ``joint_attention_kwargs["extra_tokens"]``). Folders saved before this
            field existed are UNet layers.
    """

    @register_to_config
    def __init__(self, embed_dim: int = 16, num_tokens: int = 4, cross_attention_dim: int = 768, layer_dims: tuple = (), text_length: int = 77,
                 layer_kind: str = "cross_attention") -> None:
        super().__init__()
        if layer_kind not in LAYER_KINDS:
            raise ValueError(f"layer_kind must be one of {LAYER_KINDS}, got {layer_kind!r}")
        self.project = nn.Linear(embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.to_k = nn.ModuleList(nn.Linear(cross_attention_dim, d, bias=False) for d in layer_dims)
        self.to_v = nn.ModuleList(nn.Linear(cross_attention_dim, d, bias=False) for d in layer_dims)
        self.to_out = nn.ModuleList(nn.Linear(d, d, bias=False) for d in layer_dims)
        for layer in self.to_out:
            nn.init.zeros_(layer.weight)

    @staticmethod
    def _layer_dims(layers: list[tuple[str, nn.Module]]) -> tuple[int, ...]:
        return tuple(int(m.to_q.out_features if hasattr(m.to_q, "out_features") else m.inner_dim) for _, m in layers)

    @classmethod
    def for_unet(cls, unet: nn.Module, embed_dim: int, num_tokens: int, text_length: int) -> "UserCrossAttention":
        """Layers sized for ``unet``'s cross-attention layers."""
        layers = cross_attention_layers(unet)
        if not layers:
            raise ValueError("the UNet has no cross-attention layers (attn2) to attach user tokens to")
        return cls(embed_dim=embed_dim, num_tokens=num_tokens, cross_attention_dim=int(unet.config.cross_attention_dim),
                   layer_dims=cls._layer_dims(layers), text_length=text_length)

    @classmethod
    def for_transformer(cls, transformer: nn.Module, embed_dim: int, num_tokens: int) -> "UserCrossAttention":
        """Layers sized for an SD3 transformer's joint attention layers; tokens as wide as its context stream
        (``caption_projection_dim``)."""
        layers = joint_attention_layers(transformer)
        if not layers:
            raise ValueError(f"the {type(transformer).__name__} has no joint attention layers (JointTransformerBlock.attn) to attach "
                             "user tokens to")
        return cls(embed_dim=embed_dim, num_tokens=num_tokens, cross_attention_dim=int(transformer.config.caption_projection_dim),
                   layer_dims=cls._layer_dims(layers), text_length=0, layer_kind="joint_attention")

    @classmethod
    def for_denoiser(cls, denoiser: nn.Module, embed_dim: int, num_tokens: int, text_length: int) -> "UserCrossAttention":
        """:meth:`for_unet` for a denoiser with cross-attention layers, else :meth:`for_transformer` (SD3's joint attention)."""
        if cross_attention_layers(denoiser):
            return cls.for_unet(denoiser, embed_dim, num_tokens, text_length)
        return cls.for_transformer(denoiser, embed_dim, num_tokens)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """User tokens (B, num_tokens, cross_attention_dim) of embeddings e_u (B, embed_dim)."""
        c = self.config
        return self.norm(self.project(embeddings.float()).view(-1, c.num_tokens, c.cross_attention_dim))

    tokens = forward

    def _processor(self, i: int, base):
        if self.config.layer_kind == "joint_attention":
            return JointUserAttnProcessor(base, self.to_k[i], self.to_v[i], self.to_out[i])
        return DecoupledUserAttnProcessor(base, self.to_k[i], self.to_v[i], self.to_out[i], self.config.text_length)

    def install(self, denoiser: nn.Module) -> None:
        """Wrap the processor of every attention layer of ``denoiser`` that reads the prompt (once: re-installing wraps the
        original processors again, not the installed ones)."""
        layers = _LAYERS[self.config.layer_kind](denoiser)
        if len(layers) != len(self.to_k):
            raise ValueError(f"user attention layers were built for {len(self.to_k)} {self.config.layer_kind} layers, the "
                             f"{type(denoiser).__name__} has {len(layers)}")
        for i, (_, module) in enumerate(layers):
            base = module.processor.base if isinstance(module.processor, tuple(_PROCESSORS.values())) else module.processor
            module.set_processor(self._processor(i, base))

    @staticmethod
    def uninstall(denoiser: nn.Module) -> None:
        """Restore the processors :meth:`install` wrapped."""
        for _, module in cross_attention_layers(denoiser) + joint_attention_layers(denoiser):
            if isinstance(module.processor, tuple(_PROCESSORS.values())):
                module.set_processor(module.processor.base)


__all__ = ["DecoupledUserAttnProcessor", "JointUserAttnProcessor", "LAYER_KINDS", "UserCrossAttention", "cross_attention_layers",
           "joint_attention_layers", "user_branch"]
