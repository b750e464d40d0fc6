"""Convert the official reward checkpoints into trl-gfn reward modules (and the ``trl-gfn-convert-reward`` CLI).

Why converters instead of the published packages: ``image-reward`` 1.5 does not import with
transformers 5 (removed internals), pins ``timm==0.6.13`` and ``fairscale``; ``hpsv2`` 1.2.0 cannot be
imported as shipped (its wheel lacks the BPE vocabulary), pins ``pytest==7.2.0`` / ``protobuf<4`` and
downloads ~4 GB of LAION weights before its own checkpoint. The models are small variants of CLIP, BLIP
and BERT, which ``transformers`` implements; the official weights map onto those classes exactly.

Inputs are read with ``torch.load(weights_only=True)`` or safetensors only (no pickled code is run).
Every source key must be used or be on an explicit list of keys the score does not need, and every
parameter of the target must be filled: anything else raises an error naming the keys.

Sources of the official files:
- aesthetic: ``sac+logos+ava1-l14-linearMSE.pth`` (christophschuhmann/improved-aesthetic-predictor)
  + ``openai/clip-vit-large-patch14``;
- HPSv2 / v2.1: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (xswu/HPSv2) + any CLIP BPE
  tokenizer (e.g. ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``);
- ImageReward: ``ImageReward.pt`` + ``med_config.json`` (THUDM/ImageReward) + ``google-bert/bert-base-uncased``;
- PickScore: ``yuvalkirstain/PickScore_v1`` + the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any, Mapping

import torch

from .aesthetic import AestheticScorer
from .clip_scorers import HPSv2Scorer, PickScoreScorer
from .hub import _short_list, check_tokenizer, load_state_dict_strict
from .imagereward import IMAGEREWARD_TEXT_CONFIG, ImageRewardScorer

StateDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------
# reading files
# ------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, key: str | None = None) -> StateDict:
    """Read a state dict from ``path`` (``.safetensors`` or a torch file loaded with ``weights_only=True``).

    ``key``: take ``checkpoint[key]`` (e.g. ``"state_dict"`` for the HPS files); if the file has no such
    entry but is itself a flat state dict, that is used. A ``module.`` prefix on every key (DDP) is removed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj: Any = load_file(path, device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the reason it matters here
            raise ValueError(
                f"could not read {path} with torch.load(weights_only=True) ({err}); only tensor checkpoints are "
                "accepted (no pickled code is executed). Re-save it as a plain state dict or safetensors."
            ) from err
    if key is not None and isinstance(obj, Mapping) and key in obj:
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        hint = f" (expected the weights under [{key!r}])" if key else ""
        raise ValueError(f"{path}: entries that are not tensors{hint}: {_short_list(sorted(map(str, non_tensors)))}")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_tokenizer(source: Any) -> Any:
    """A tokenizer object as is, or ``AutoTokenizer.from_pretrained(source)`` for an id / directory."""
    if source is None:
        raise ValueError("a tokenizer (object, Hub id or directory) is required")
    if not isinstance(source, (str, os.PathLike)):
        return source
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(source))


def _instantiate(cls, state_dict: StateDict, source: str, **kwargs):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls(**kwargs)
    load_state_dict_strict(model, state_dict, source=source, assign=True)
    return model.freeze()


def _check_consumed(state: StateDict, used: set[str], ignored: set[str], source: str) -> None:
    left = sorted(set(state) - used - ignored)
    if left:
        raise ValueError(
            f"{source}: {len(left)} key(s) not understood by the converter: {_short_list(left)}. The file is not the "
            "expected official checkpoint (or a different architecture variant)."
        )


def _layer_indices(state: Mapping[str, Any], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state for m in [pat.match(k)] if m})


def _require(state: Mapping[str, Any], keys: list[str], source: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{source}: missing key(s) {_short_list(missing)}; not the expected official checkpoint")


# ------------------------------------------------------------------------------------------------
# OpenCLIP (HPSv2) -> transformers CLIPModel
# ------------------------------------------------------------------------------------------------
def _convert_openclip_tower(state: StateDict, src: str, dst: str, n_layers: int, out: StateDict, used: set[str]) -> None:
    names = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for i in range(n_layers):
        s, d = f"{src}.resblocks.{i}.", f"{dst}.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = state[s + f"attn.in_proj_{kind}"]
            q, k, v = qkv.chunk(3, dim=0)
            out[d + f"self_attn.q_proj.{kind}"] = q.clone()
            out[d + f"self_attn.k_proj.{kind}"] = k.clone()
            out[d + f"self_attn.v_proj.{kind}"] = v.clone()
            used.add(s + f"attn.in_proj_{kind}")
            for a, b in names.items():
                out[d + f"{b}.{kind}"] = state[s + f"{a}.{kind}"]
                used.add(s + f"{a}.{kind}")


def convert_openclip_state_dict(state: StateDict, *, head_width: int = 64, source: str = "OpenCLIP checkpoint") -> tuple[dict, StateDict]:
    """Map an OpenCLIP ViT state dict (HPSv2 / v2.1) onto ``transformers.CLIPModel``; return ``(config, state)``.

    The architecture is read off the tensor shapes; the number of heads is ``width // head_width``
    (OpenCLIP's convention, 64 for every released ViT). Token ids of the text config are placeholders:
    :func:`convert_hpsv2` sets them from the tokenizer.
    """
    _require(state, ["visual.conv1.weight", "visual.positional_embedding", "visual.class_embedding", "visual.proj",
                     "token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"], source)
    used: set[str] = set()
    out: StateDict = {}
    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    n_pos = state["visual.positional_embedding"].shape[0]
    grid = int(round(math.sqrt(n_pos - 1)))
    if grid * grid != n_pos - 1:
        raise ValueError(f"{source}: visual.positional_embedding has {n_pos} rows, not 1 + a square number of patches")
    v_layers = _layer_indices(state, "visual.transformer.resblocks.")
    t_layers = _layer_indices(state, "transformer.resblocks.")
    if not v_layers or not t_layers or v_layers != list(range(len(v_layers))) or t_layers != list(range(len(t_layers))):
        raise ValueError(f"{source}: transformer blocks not numbered 0..N-1 (vision {v_layers[:3]}..., text {t_layers[:3]}...)")
    vocab, t_width = state["token_embedding.weight"].shape
    ctx = state["positional_embedding"].shape[0]
    proj_dim = state["visual.proj"].shape[1]
    if state["text_projection"].shape != (t_width, proj_dim):
        raise ValueError(f"{source}: text_projection {tuple(state['text_projection'].shape)} does not match ({t_width}, {proj_dim})")
    for w in (v_width, t_width):
        if w % head_width:
            raise ValueError(f"{source}: width {w} is not a multiple of head_width={head_width}")
    config = dict(
        projection_dim=int(proj_dim),
        logit_scale_init_value=float(state["logit_scale"]),
        text_config=dict(
            vocab_size=int(vocab), hidden_size=int(t_width),
            intermediate_size=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            num_hidden_layers=len(t_layers), num_attention_heads=int(t_width // head_width),
            max_position_embeddings=int(ctx), hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=int(proj_dim),
        ),
        vision_config=dict(
            hidden_size=int(v_width),
            intermediate_size=int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            num_hidden_layers=len(v_layers), num_attention_heads=int(v_width // head_width),
            image_size=int(grid * patch), patch_size=int(patch), hidden_act="gelu", layer_norm_eps=1e-5,
            projection_dim=int(proj_dim),
        ),
    )
    simple = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    _require(state, list(simple), source)
    for a, b in simple.items():
        out[b] = state[a]
        used.add(a)
    out["visual_projection.weight"] = state["visual.proj"].t().contiguous()
    out["text_projection.weight"] = state["text_projection"].t().contiguous()
    used.update({"visual.proj", "text_projection"})
    try:
        _convert_openclip_tower(state, "visual.transformer", "vision_model.encoder", len(v_layers), out, used)
        _convert_openclip_tower(state, "transformer", "text_model.encoder", len(t_layers), out, used)
    except KeyError as err:
        raise ValueError(f"{source}: missing key {err.args[0]!r} in a transformer block") from err
    # `attn_mask` is a constant causal mask that older OpenCLIP versions stored as a buffer
    _check_consumed(state, used, {"attn_mask"}, source)
    return config, out


def convert_hpsv2(checkpoint: str | os.PathLike | StateDict, tokenizer: Any, version: str = "v2.1", head_width: int = 64) -> HPSv2Scorer:
    """Build an :class:`HPSv2Scorer` from ``HPS_v2(.1)_compressed.pt`` (or its ``['state_dict']``) and a CLIP tokenizer."""
    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict"
    state = load_checkpoint(checkpoint, key="state_dict") if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
    config, hf_state = convert_openclip_state_dict(state, head_width=head_width, source=source)
    tok = load_tokenizer(tokenizer)
    check_tokenizer(tok, config["text_config"]["vocab_size"], where="HPSv2 tokenizer")
    if tok.eos_token_id is None or tok.bos_token_id is None:
        raise ValueError("HPSv2 tokenizer must define bos and eos tokens (<|startoftext|>, <|endoftext|>)")
    config["text_config"].update(
        bos_token_id=int(tok.bos_token_id), eos_token_id=int(tok.eos_token_id),
        pad_token_id=int(tok.pad_token_id if tok.pad_token_id is not None else 0),
    )
    hf_state = {"clip." + k: v for k, v in hf_state.items()}
    model = _instantiate(HPSv2Scorer, hf_state, source, clip_config=config, version=version)
    model.set_tokenizer(tok)
    return model


# ------------------------------------------------------------------------------------------------
# ImageReward (BLIP ViT + BERT with cross-attention) -> BlipVisionModel + BlipTextModel
# ------------------------------------------------------------------------------------------------
IMAGEREWARD_IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")


def _head_dims(state: StateDict, prefix: str, source: str) -> tuple[int, list[int]]:
    idx = sorted(int(m.group(1)) for k in state for m in [re.match(re.escape(prefix) + r"(\d+)\.weight$", k)] if m)
    if not idx:
        raise ValueError(f"{source}: no `{prefix}N.weight` keys (affine head) found")
    shapes = [state[f"{prefix}{i}.weight"].shape for i in idx]
    if shapes[-1][0] != 1:
        raise ValueError(f"{source}: the last head layer {prefix}{idx[-1]} has {shapes[-1][0]} outputs, expected 1")
    return int(shapes[0][1]), [int(s[0]) for s in shapes[:-1]]


def prepare_imagereward_tokenizer(tokenizer: Any) -> Any:
    """Add BLIP's ``[DEC]`` (bos) and ``[ENC]`` special tokens to a ``bert-base-uncased`` tokenizer (30522 -> 30524)."""
    vocab = tokenizer.get_vocab()
    if "[DEC]" not in vocab:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def med_config_to_blip_text_config(med_config: Mapping[str, Any], encoder_hidden_size: int) -> dict:
    """Translate ImageReward's ``med_config.json`` (BLIP's BERT) into ``BlipTextConfig`` arguments.

    BLIP overwrites ``encoder_width`` with the vision width, so ``encoder_hidden_size`` comes from the image
    encoder. ``is_decoder=True`` is what makes ``BlipTextModel`` build its cross-attention layers; the
    scorer calls it with ``is_decoder=False`` (bidirectional self-attention), as ImageReward does.
    """
    if not med_config.get("add_cross_attention", False):
        raise ValueError("med_config: add_cross_attention must be true (ImageReward's text encoder cross-attends to the image)")
    if med_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"med_config: position_embedding_type={med_config['position_embedding_type']!r} is not supported (expected 'absolute')")
    cfg = dict(IMAGEREWARD_TEXT_CONFIG)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id"):
        if key in med_config:
            cfg[key] = med_config[key]
    cfg.update(encoder_hidden_size=int(encoder_hidden_size), is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for key in ("bos_token_id", "sep_token_id", "eos_token_id"):
        if cfg.get(key) is not None and cfg[key] >= cfg["vocab_size"]:
            cfg[key] = None
    return cfg


def convert_imagereward_state_dict(state: StateDict, med_config: Mapping[str, Any], *, head_width: int = 64, source: str = "ImageReward checkpoint") -> tuple[dict, StateDict]:
    """Map ``ImageReward.pt`` onto :class:`ImageRewardScorer` keys; return ``(constructor kwargs, state)``.

    Vision (BLIP/timm ViT): ``cls_token``, ``pos_embed``, ``patch_embed.proj`` -> embeddings; blocks'
    ``norm1/2``, ``attn.qkv``, ``attn.proj`` -> ``layer_norm1/2``, ``self_attn.qkv``,
    ``self_attn.projection``; ``norm`` -> ``post_layernorm``. Text keys are unchanged (BLIP's BERT has the
    layout of ``BlipTextModel``); ``position_ids`` buffers and BLIP's unused ``vision_proj`` / ``text_proj``
    are dropped.
    """
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    _require(state, [v + "cls_token", v + "pos_embed", v + "patch_embed.proj.weight", v + "norm.weight"], source)
    used: set[str] = set()
    out: StateDict = {}
    width = state[v + "cls_token"].shape[-1]
    patch = state[v + "patch_embed.proj.weight"].shape[-1]
    n_pos = state[v + "pos_embed"].shape[1]
    grid = int(round(math.sqrt(n_pos - 1)))
    layers = _layer_indices(state, v + "blocks.")
    if grid * grid != n_pos - 1 or not layers or layers != list(range(len(layers))):
        raise ValueError(f"{source}: unexpected ViT layout (pos_embed rows {n_pos}, blocks {layers[:3]}...)")
    if width % head_width:
        raise ValueError(f"{source}: vision width {width} is not a multiple of head_width={head_width}")
    vision_config = dict(
        hidden_size=int(width), intermediate_size=int(state[v + "blocks.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=len(layers), num_attention_heads=int(width // head_width), image_size=int(grid * patch),
        patch_size=int(patch), hidden_act="gelu", layer_norm_eps=1e-6,
    )
    simple = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    block = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in layers:
        for a, b in block.items():
            for kind in ("weight", "bias"):
                simple[f"blocks.{i}.{a}.{kind}"] = f"encoder.layers.{i}.{b}.{kind}"
    _require(state, [v + a for a in simple], source)
    for a, b in simple.items():
        out["vision." + b] = state[v + a]
        used.add(v + a)
    for key, value in state.items():
        if key.startswith(t) and not key.endswith("position_ids"):
            out["text." + key[len(t) :]] = value
            used.add(key)
        elif key.startswith("mlp.layers."):
            out[key] = value
            used.add(key)
    ignored = {k for k in state if k.startswith(IMAGEREWARD_IGNORED_PREFIXES) or k.endswith("position_ids")}
    _check_consumed(state, used, ignored, source)
    head_in, head_dims = _head_dims(state, "mlp.layers.", source)
    text_config = med_config_to_blip_text_config(med_config, encoder_hidden_size=int(width))
    if head_in != text_config["hidden_size"]:
        raise ValueError(f"{source}: head input {head_in} != text hidden size {text_config['hidden_size']}")
    return dict(vision_config=vision_config, text_config=text_config, head_hidden_dims=head_dims), out


def convert_imagereward(checkpoint: str | os.PathLike | StateDict, med_config: str | os.PathLike | Mapping[str, Any], tokenizer: Any, head_width: int = 64) -> ImageRewardScorer:
    """Build an :class:`ImageRewardScorer` from ``ImageReward.pt``, its ``med_config.json`` and a BERT tokenizer.

    ``tokenizer``: ``bert-base-uncased`` (object, id or directory); BLIP's ``[DEC]``/``[ENC]`` tokens are added.
    """
    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict"
    state = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
    if isinstance(med_config, (str, os.PathLike)):
        with open(med_config, encoding="utf-8") as f:
            med_config = json.load(f)
    kwargs, hf_state = convert_imagereward_state_dict(state, med_config, head_width=head_width, source=source)
    tok = prepare_imagereward_tokenizer(load_tokenizer(tokenizer))
    model = _instantiate(ImageRewardScorer, hf_state, source, **kwargs)
    model.set_tokenizer(tok)
    return model


# ------------------------------------------------------------------------------------------------
# aesthetic head + CLIP ViT-L/14, PickScore
# ------------------------------------------------------------------------------------------------
def _load_transformers_model(model_cls, source: Any, what: str):
    if not isinstance(source, (str, os.PathLike)):
        return source
    model, info = model_cls.from_pretrained(os.fspath(source), output_loading_info=True)
    missing = sorted(set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())})
    if missing:
        raise ValueError(
            f"{what} {source!r} loaded with {len(missing)} missing or mismatched weight(s): {_short_list(missing)}; "
            "transformers leaves those at random values without raising, so the conversion stops here"
        )
    return model


def convert_aesthetic(head: str | os.PathLike | StateDict, clip: Any = "openai/clip-vit-large-patch14") -> AestheticScorer:
    """Build an :class:`AestheticScorer` from the aesthetic head (``layers.*`` keys) and a CLIP ViT-L/14.

    ``clip``: a ``CLIPModel`` / ``CLIPVisionModelWithProjection`` or its Hub id / directory.
    """
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    source = os.fspath(head) if isinstance(head, (str, os.PathLike)) else "head state dict"
    head_state = load_checkpoint(head) if isinstance(head, (str, os.PathLike)) else dict(head)
    head_in, head_dims = _head_dims(head_state, "layers.", source)
    unknown = sorted(k for k in head_state if not re.match(r"layers\.\d+\.(weight|bias)$", k))
    if unknown:
        raise ValueError(f"{source}: key(s) not part of the aesthetic head: {_short_list(unknown)}")
    model = _load_transformers_model(CLIPVisionModelWithProjection, clip, "CLIP model")
    if isinstance(model, CLIPModel):
        vision_state = {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
        vision_config = model.config.vision_config.to_dict()
        vision_config["projection_dim"] = model.config.projection_dim
    elif isinstance(model, CLIPVisionModelWithProjection):
        vision_state, vision_config = model.state_dict(), model.config.to_dict()
    else:
        raise TypeError(f"clip must be a CLIPModel, CLIPVisionModelWithProjection, Hub id or directory, got {type(model).__name__}")
    if vision_config["projection_dim"] != head_in:
        raise ValueError(f"aesthetic head expects {head_in}-d embeddings but the CLIP projection is {vision_config['projection_dim']}-d")
    state = {"clip." + k: v for k, v in vision_state.items() if not k.endswith("position_ids")}
    state.update({"mlp." + k: v for k, v in head_state.items()})
    return _instantiate(AestheticScorer, state, source, vision_config=vision_config, head_hidden_dims=head_dims)


def convert_pickscore(model: Any = "yuvalkirstain/PickScore_v1", tokenizer: Any = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K") -> PickScoreScorer:
    """Repackage PickScore (a ``transformers.CLIPModel``) with its tokenizer as a :class:`PickScoreScorer`."""
    from transformers import CLIPModel

    clip = _load_transformers_model(CLIPModel, model, "PickScore model")
    if not isinstance(clip, CLIPModel):
        raise TypeError(f"PickScore model must be a CLIPModel, got {type(clip).__name__}")
    state = {"clip." + k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    scorer = _instantiate(PickScoreScorer, state, str(model), clip_config=clip.config.to_dict())
    scorer.set_tokenizer(load_tokenizer(tokenizer))
    return scorer


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _verify_roundtrip(model, output_dir: str) -> float:
    """Reload the saved reward and compare a score; return the absolute difference."""
    reloaded = type(model).from_pretrained(output_dir)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, model.image_size, model.image_size, generator=g)
    prompts = ["a photo of a cat"]
    with torch.no_grad():
        a, _ = model(images, prompts)
        b, _ = reloaded(images, prompts)
    diff = float((a - b).abs().max())
    if diff > 1e-5:
        raise RuntimeError(f"saved reward in {output_dir} does not reproduce the converted one (|diff| = {diff:.3g})")
    return diff


def build_parser() -> argparse.ArgumentParser:
    """The ``trl-gfn-convert-reward`` argument parser (one sub-command per reward)."""
    parser = argparse.ArgumentParser(
        prog="trl-gfn-convert-reward",
        description="Convert official reward-model checkpoints into trl-gfn reward modules (save_pretrained / push_to_hub).",
    )
    sub = parser.add_subparsers(dest="reward", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", required=True, help="output directory (save_pretrained)")
        p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also upload to this Hub repository")
        p.add_argument("--private", action="store_true", help="create the Hub repository as private")
        p.add_argument("--no-verify", action="store_true", help="skip reloading the output and comparing a score")

    p = sub.add_parser("aesthetic", help="LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE.pth + CLIP ViT-L/14)")
    p.add_argument("--head", required=True, help="the aesthetic head file (.pth / .safetensors, keys layers.*)")
    p.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP ViT-L/14 Hub id or directory")
    common(p)

    p = sub.add_parser("hpsv2", help="HPSv2 / HPSv2.1 (HPS_v2(.1)_compressed.pt, OpenCLIP ViT-H-14)")
    p.add_argument("--checkpoint", required=True, help="HPS_v2_compressed.pt or HPS_v2.1_compressed.pt")
    p.add_argument("--version", choices=HPSv2Scorer.VERSIONS, default="v2.1", help="which HPS release the file is")
    p.add_argument("--tokenizer", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", help="CLIP BPE tokenizer id or directory")
    p.add_argument("--head-width", type=int, default=64, help="attention head width (heads = width / head-width; 64 in OpenCLIP)")
    common(p)

    p = sub.add_parser("imagereward", help="ImageReward v1.0 (ImageReward.pt + med_config.json)")
    p.add_argument("--checkpoint", required=True, help="ImageReward.pt")
    p.add_argument("--med-config", required=True, help="ImageReward's med_config.json")
    p.add_argument("--tokenizer", default="google-bert/bert-base-uncased", help="bert-base-uncased tokenizer id or directory")
    p.add_argument("--head-width", type=int, default=64, help="ViT attention head width (heads = width / head-width; 64 in BLIP)")
    common(p)

    p = sub.add_parser("pickscore", help="PickScore v1 (a transformers CLIPModel)")
    p.add_argument("--model", default="yuvalkirstain/PickScore_v1", help="PickScore Hub id or directory")
    p.add_argument("--tokenizer", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", help="tokenizer id or directory")
    common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trl-gfn-convert-reward``: convert, save, verify, optionally push."""
    args = build_parser().parse_args(argv)
    if args.reward == "aesthetic":
        model = convert_aesthetic(args.head, args.clip)
    elif args.reward == "hpsv2":
        model = convert_hpsv2(args.checkpoint, args.tokenizer, version=args.version, head_width=args.head_width)
    elif args.reward == "imagereward":
        model = convert_imagereward(args.checkpoint, args.med_config, args.tokenizer, head_width=args.head_width)
    else:
        model = convert_pickscore(args.model, args.tokenizer)
    model.save_pretrained(args.output)
    print(f"saved {type(model).__name__} to {args.output}")
    if not args.no_verify:
        diff = _verify_roundtrip(model, args.output)
        print(f"verified: reloaded reward reproduces the converted one (max |diff| = {diff:.2e})")
    if args.push_to_hub:
        url = model.push_to_hub(args.push_to_hub, private=args.private or None)
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
