"""Converters from the official checkpoints: tiny models in the *original* key layout and with an
independent reference forward (written here after OpenCLIP / BLIP / improved-aesthetic-predictor)
convert, load strictly, and score the same; bad files raise errors that name the keys."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from test_rewards_fixtures import (
    BERT_VOCAB,
    CLIP_VOCAB,
    tiny_aesthetic_vision_config,
    tiny_bert_tokenizer,
    tiny_clip_config,
    tiny_clip_tokenizer,
)
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from trl_gfn.rewards import AestheticScorer, HPSv2Scorer, ImageRewardScorer, PickScoreScorer
from trl_gfn.rewards.convert import (
    convert_aesthetic,
    convert_hpsv2,
    convert_imagereward,
    convert_openclip_state_dict,
    convert_pickscore,
    load_checkpoint,
    main,
)
from trl_gfn.rewards.preprocess import clip_preprocess

PROMPTS = ["a red cat", "a photo of the blue car"]


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = any(s in name for s in ("ln_", "norm", "LayerNorm")) and p.ndim == 1
            p.copy_((1 + 0.1 * noise) if is_norm and name.endswith("weight") else 0.1 * noise)
    return module


def _images(batch=2, h=48, w=40, seed=0):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ================================================================================== OpenCLIP reference (HPSv2)
class RefResBlock(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, hidden), gelu=nn.GELU(), c_proj=nn.Linear(hidden, d)))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, d, layers, heads, hidden):
        super().__init__()
        self.resblocks = nn.ModuleList([RefResBlock(d, heads, hidden) for _ in range(layers)])

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class RefVisual(nn.Module):
    def __init__(self, width, layers, heads, hidden, patch, image, out_dim):
        super().__init__()
        grid = image // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads, hidden)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class RefOpenCLIP(nn.Module):
    """OpenCLIP's CLIP (ViT) module layout and forward, independent of transformers."""

    def __init__(self, vocab=CLIP_VOCAB, ctx=16, width=32, heads=2, layers=2, hidden=48, v_width=32, v_layers=2, patch=8, image=32, out=16):
        super().__init__()
        self.visual = RefVisual(v_width, v_layers, heads, hidden, patch, image, out)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(ctx, width))
        self.transformer = RefTransformer(width, layers, heads, hidden)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, out))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        n = ids.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)
        x = self.ln_final(self.transformer(x, mask))
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection

    def hps(self, pixels, ids):
        img = F.normalize(self.visual(pixels), dim=-1)
        txt = F.normalize(self.encode_text(ids), dim=-1)
        return (img * txt).sum(-1)


def _openclip_checkpoint(tmp_path, seed=0):
    ref = _randomize(RefOpenCLIP(), seed).eval()
    with torch.no_grad():
        ref.logit_scale.fill_(math.log(100.0))
    path = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": ref.state_dict()}, path)
    return ref, path


def test_hpsv2_conversion_matches_openclip_reference(tmp_path):
    ref, path = _openclip_checkpoint(tmp_path)
    tok = tiny_clip_tokenizer()
    scorer = convert_hpsv2(path, tok, version="v2.0", head_width=16)
    assert scorer.clip.config.vision_config.num_attention_heads == 2 and scorer.clip.config.text_config.eos_token_id == 513
    images = _images()  # non-square: exercises the resize-longest-side + zero padding path
    ids = tok(PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = ref.hps(clip_preprocess(images, 32, mode="pad"), ids)
        got, _ = scorer(images, PROMPTS)
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    # and through save_pretrained / from_pretrained (strict)
    scorer.save_pretrained(tmp_path / "out")
    again, _ = HPSv2Scorer.from_pretrained(tmp_path / "out")(images, PROMPTS)
    assert torch.equal(again, got)


def test_openclip_converter_names_bad_keys():
    ref = RefOpenCLIP()
    state = dict(ref.state_dict())
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)
    with pytest.raises(ValueError, match=r"1 key\(s\) not understood by the converter: visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        convert_openclip_state_dict(state, head_width=16)
    state = dict(ref.state_dict())
    del state["transformer.resblocks.1.ln_2.bias"]
    with pytest.raises(ValueError, match=r"missing key 'transformer\.resblocks\.1\.ln_2\.bias'"):
        convert_openclip_state_dict(state, head_width=16)
    state = dict(ref.state_dict())
    del state["visual.proj"]
    with pytest.raises(ValueError, match=r"missing key\(s\) visual\.proj"):
        convert_openclip_state_dict(state, head_width=16)


class NotATensor:
    """Stands for arbitrary pickled code in a checkpoint."""


def test_load_checkpoint_is_weights_only(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(tmp_path / "evil.pt", key="state_dict")
    torch.save({"epoch": 3, "state_dict": {"module.w": torch.ones(1)}}, tmp_path / "ok.pt")
    assert list(load_checkpoint(tmp_path / "ok.pt", key="state_dict")) == ["w"]  # DDP prefix removed
    torch.save({"epoch": 3, "weights": {"w": torch.ones(1)}}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match=r"not tensors \(expected the weights under \['state_dict'\]\): epoch, weights"):
        load_checkpoint(tmp_path / "nested.pt", key="state_dict")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


# ================================================================================== BLIP / ImageReward reference
class RefViTAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RefViTBlock(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = RefViTAttention(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class RefBLIPViT(nn.Module):
    """BLIP's VisionTransformer layout (timm-style) and forward: final norm on every token."""

    def __init__(self, d=32, layers=2, heads=2, hidden=48, patch=8, image=32):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, d))
        self.blocks = nn.ModuleList([RefViTBlock(d, heads, hidden) for _ in range(layers)])
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class RefBertAttention(nn.Module):
    def __init__(self, d, heads, kv_dim):
        super().__init__()
        self.heads = heads
        self.self = nn.Module()
        self.self.query, self.self.key, self.self.value = nn.Linear(d, d), nn.Linear(kv_dim, d), nn.Linear(kv_dim, d)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(d, d), nn.LayerNorm(d, eps=1e-12)

    def forward(self, h, kv, key_mask=None):
        b, n, d = h.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.self.query(h)), split(self.self.key(kv)), split(self.self.value(kv))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.output.LayerNorm(self.output.dense(ctx) + h)


class RefBertLayer(nn.Module):
    def __init__(self, d, heads, hidden, enc_width):
        super().__init__()
        self.attention = RefBertAttention(d, heads, d)
        self.crossattention = RefBertAttention(d, heads, enc_width)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, hidden)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(hidden, d), nn.LayerNorm(d, eps=1e-12)

    def forward(self, h, mask, enc):
        h = self.attention(h, h, mask)
        h = self.crossattention(h, enc)
        return self.output.LayerNorm(self.output.dense(F.gelu(self.intermediate.dense(h))) + h)


class RefMedBert(nn.Module):
    """BLIP's med.py BertModel (multimodal mode, no pooler) layout and forward."""

    def __init__(self, vocab=BERT_VOCAB, d=24, layers=2, heads=2, hidden=40, max_pos=40, enc_width=32):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, d)
        self.embeddings.position_embeddings = nn.Embedding(max_pos, d)
        self.embeddings.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.embeddings.register_buffer("position_ids", torch.arange(max_pos)[None])
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([RefBertLayer(d, heads, hidden, enc_width) for _ in range(layers)])

    def forward(self, ids, mask, enc):
        e = self.embeddings
        h = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(e.position_ids[:, : ids.shape[1]]))
        for layer in self.encoder.layer:
            h = layer(h, mask, enc)
        return h


class RefImageReward(nn.Module):
    def __init__(self):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = RefBLIPViT()
        self.blip.text_encoder = RefMedBert()
        self.blip.vision_proj, self.blip.text_proj = nn.Linear(32, 8), nn.Linear(24, 8)  # unused by the score
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(nn.Linear(24, 20), nn.Dropout(0.2), nn.Linear(20, 10), nn.Dropout(0.2), nn.Linear(10, 8),
                                        nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1))

    def score(self, pixels, ids, mask):
        image_embeds = self.blip.visual_encoder(pixels)
        txt = self.blip.text_encoder(ids, mask, image_embeds)[:, 0]
        return ((self.mlp.layers(txt) - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
              "hidden_size": 24, "initializer_range": 0.02, "intermediate_size": 40, "layer_norm_eps": 1e-12,
              "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2, "num_hidden_layers": 2,
              "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": BERT_VOCAB, "encoder_width": 24, "add_cross_attention": True}


def test_imagereward_conversion_matches_blip_reference_via_cli(tmp_path):
    ref = _randomize(RefImageReward(), 4).eval()
    torch.save(ref.state_dict(), tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED_CONFIG))
    tiny_bert_tokenizer(with_blip_tokens=False).save_pretrained(tmp_path / "bert")  # the converter adds [DEC]/[ENC]
    assert main(["imagereward", "--checkpoint", str(tmp_path / "ImageReward.pt"), "--med-config", str(tmp_path / "med_config.json"),
                 "--tokenizer", str(tmp_path / "bert"), "--head-width", "16", "--output", str(tmp_path / "out")]) == 0
    scorer = ImageRewardScorer.from_pretrained(tmp_path / "out")
    assert len(scorer.tokenizer) == BERT_VOCAB
    images = _images()
    tok = tiny_bert_tokenizer()
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = ref.score(clip_preprocess(images, 32, mode="crop"), enc["input_ids"], enc["attention_mask"])
        got, _ = scorer(images, PROMPTS)
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)


def test_imagereward_converter_names_unknown_keys(tmp_path):
    state = dict(_randomize(RefImageReward(), 5).state_dict())
    state["blip.itm_head.weight"] = torch.zeros(2, 24)
    with pytest.raises(ValueError, match=r"not understood by the converter: blip\.itm_head\.weight"):
        convert_imagereward(state, MED_CONFIG, tiny_bert_tokenizer(with_blip_tokens=False), head_width=16)
    bad_med = dict(MED_CONFIG, add_cross_attention=False)
    with pytest.raises(ValueError, match="add_cross_attention must be true"):
        convert_imagereward(dict(RefImageReward().state_dict()), bad_med, tiny_bert_tokenizer(with_blip_tokens=False), head_width=16)


# ================================================================================== aesthetic & PickScore
def test_aesthetic_conversion_via_cli(tmp_path):
    clip = _randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(**tiny_aesthetic_vision_config())), 6).eval()
    clip.save_pretrained(tmp_path / "clip")
    head = _randomize(nn.Sequential(nn.Linear(16, 24), nn.Dropout(0.2), nn.Linear(24, 12), nn.Dropout(0.2), nn.Linear(12, 8),
                                    nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1)), 7).eval()
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert main(["aesthetic", "--head", str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), "--clip", str(tmp_path / "clip"),
                 "--output", str(tmp_path / "out")]) == 0
    scorer = AestheticScorer.from_pretrained(tmp_path / "out")
    images = _images()
    with torch.no_grad():
        emb = clip(pixel_values=clip_preprocess(images, 32, mode="crop")).image_embeds
        expected = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
        got, _ = scorer(images)
    assert torch.allclose(got, expected, atol=1e-6)


def test_aesthetic_converter_rejects_partial_clip(tmp_path):
    from safetensors.torch import load_file, save_file

    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**tiny_aesthetic_vision_config()))
    clip.save_pretrained(tmp_path / "clip")
    state = load_file(tmp_path / "clip" / "model.safetensors")
    state.pop("visual_projection.weight")
    save_file(state, tmp_path / "clip" / "model.safetensors", metadata={"format": "pt"})
    head = {f"layers.{i}.{k}": torch.zeros(o, n) if k == "weight" else torch.zeros(o)
            for i, (n, o) in {0: (16, 8), 2: (8, 1)}.items() for k in ("weight", "bias")}
    with pytest.raises(ValueError, match=r"missing or mismatched weight\(s\): visual_projection\.weight"):
        convert_aesthetic(head, str(tmp_path / "clip"))


def test_pickscore_conversion(tmp_path):
    clip = _randomize(CLIPModel(CLIPConfig.from_dict(tiny_clip_config())), 8).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(100.0))
    clip.save_pretrained(tmp_path / "pick")
    tiny_clip_tokenizer().save_pretrained(tmp_path / "tok")
    scorer = convert_pickscore(str(tmp_path / "pick"), str(tmp_path / "tok"))
    scorer.save_pretrained(tmp_path / "out")
    scorer = PickScoreScorer.from_pretrained(tmp_path / "out")
    images = _images()
    tok = tiny_clip_tokenizer()
    text_inputs = tok(PROMPTS, padding=True, truncation=True, max_length=16, return_tensors="pt")  # PickScore's own call
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=clip_preprocess(images, 32, mode="crop")).pooler_output
        txt = clip.get_text_features(**text_inputs).pooler_output
        expected = 100.0 * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
        got, _ = scorer(images, PROMPTS)
    assert torch.allclose(got, expected, atol=1e-4)
    assert got.abs().max() > 1  # the logit scale (100) is applied


def test_cli_reports_missing_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["hpsv2"])
    assert "--checkpoint" in capsys.readouterr().err
