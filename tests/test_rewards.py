"""Reward modules: preprocessing, gradients, float32 scoring, strict Hub I/O, composites, presets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_rewards_fixtures import (
    tiny_aesthetic_vision_config,
    tiny_bert_tokenizer,
    tiny_blip_configs,
    tiny_clip_config,
    tiny_clip_tokenizer,
)
from transformers import CLIPTokenizer

from trl_gfn.rewards import (
    REWARD_PRESETS,
    AestheticScorer,
    CallableReward,
    CompositeReward,
    HPSv2Scorer,
    ImageRewardScorer,
    PickScoreScorer,
    load_reward,
    validate_rewards,
)
from trl_gfn.rewards.preprocess import center_crop, clip_preprocess, resize, resize_longest_side_and_pad, resize_shortest_side

PROMPTS = ["a red cat", "a photo of a blue car"]


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (incl. LayerNorms), so that a wrong mapping changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name.lower() or "ln" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def make_aesthetic():
    return _randomize(AestheticScorer(vision_config=tiny_aesthetic_vision_config(), head_hidden_dims=(24, 12, 8, 4)))


def make_hps():
    m = _randomize(HPSv2Scorer(clip_config=tiny_clip_config(), version="v2.0"), 1)
    m.set_tokenizer(tiny_clip_tokenizer())
    return m


def make_pick():
    m = _randomize(PickScoreScorer(clip_config=tiny_clip_config()), 2)
    m.set_tokenizer(tiny_clip_tokenizer())
    return m


def make_imagereward():
    vision, text = tiny_blip_configs()
    m = _randomize(ImageRewardScorer(vision_config=vision, text_config=text, head_hidden_dims=(20, 10, 8, 4)), 3)
    m.set_tokenizer(tiny_bert_tokenizer())
    return m


MAKERS = {"aesthetic": make_aesthetic, "hpsv2": make_hps, "pickscore": make_pick, "imagereward": make_imagereward}


def _images(batch=2, h=64, w=64, seed=0):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- preprocessing
def test_resize_matches_pil_bicubic():
    """The torch resize reproduces PIL's antialiased bicubic (what the official preprocessing uses)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(90, 70, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(arr).resize((32, 41), Image.BICUBIC)).astype(np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0
    out = resize(x, (41, 32))[0].permute(1, 2, 0).clamp(0, 1).numpy()
    assert np.abs(out - ref).max() < 2.5 / 255  # PIL rounds to uint8
    assert np.abs(out - ref).mean() < 0.6 / 255


def test_geometry_of_crop_and_pad():
    x = _images(1, 60, 90)
    short = resize_shortest_side(x, 32)
    assert tuple(short.shape[-2:]) == (32, 48)
    assert tuple(center_crop(short, 32).shape[-2:]) == (32, 32)
    padded = resize_longest_side_and_pad(torch.ones(1, 3, 60, 90), 30, fill=0.0)
    assert tuple(padded.shape[-2:]) == (30, 30)
    # 60x90 -> 20x30, 10 rows of zeros split 5 / 5
    assert padded[..., :5, :].abs().max() == 0 and padded[..., 25:, :].abs().max() == 0
    assert torch.allclose(padded[..., 5:25, :], torch.ones(1, 3, 20, 30), atol=1e-5)
    with pytest.raises(ValueError, match="'crop' or 'pad'"):
        clip_preprocess(x, 32, mode="squash")


# ---------------------------------------------------------------------------------------------- contract & gradients
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_reward_contract_and_pixel_gradients(name):
    model = MAKERS[name]()
    images = _images().requires_grad_(True)
    out = model(images, PROMPTS, [{}, {}])
    rewards, metadata = validate_rewards(out, 2, need_grad=True)
    assert rewards.dtype == torch.float32 and isinstance(metadata, dict)
    rewards.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())  # frozen
    assert rewards[0] != rewards[1]


@pytest.mark.parametrize("name", ["hpsv2", "imagereward"])
def test_prompt_changes_score(name):
    model = MAKERS[name]()
    images = _images(1).expand(2, -1, -1, -1)
    rewards, _ = model(images, ["a red cat", "the blue car on a dog"])
    assert abs(float(rewards[0] - rewards[1])) > 1e-6


def test_gradient_matches_finite_differences():
    """Directional derivative through resize + CLIP equals the autograd gradient."""
    model = make_hps().double()
    model._check_float32 = lambda: None  # float64 only for this numerical check
    x = _images(1, 48, 40).double().requires_grad_(True)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = lambda t: model.score(t, ["a red cat"], [{}]).sum()  # noqa: E731
    (grad,) = torch.autograd.grad(f(x), x)
    eps = 1e-5
    fd = (f(x.detach() + eps * direction) - f(x.detach() - eps * direction)) / (2 * eps)
    assert torch.allclose((grad * direction).sum(), fd, rtol=1e-5, atol=1e-9)


def test_bf16_inputs_are_scored_in_float32():
    model = make_aesthetic()
    seen = []
    hook = model.mlp.layers[0].register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    images = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rewards_bf16, _ = model(images.bfloat16(), PROMPTS)
    hook.remove()
    assert seen == [(torch.float32, torch.float32)]
    assert rewards_bf16.dtype == torch.float32
    rewards_ref, _ = model(images.bfloat16().float(), PROMPTS)
    assert torch.equal(rewards_bf16, rewards_ref)


def test_non_float32_parameters_raise():
    model = make_aesthetic().to(torch.bfloat16)
    with pytest.raises(ValueError, match="score in float32"):
        model(_images(), PROMPTS)


def test_missing_or_empty_tokenizer_raises():
    model = HPSv2Scorer(clip_config=tiny_clip_config())
    with pytest.raises(ValueError, match="no tokenizer"):
        model(_images(), PROMPTS)
    with pytest.raises(ValueError, match="has 2 tokens but the text encoder expects 514"):
        model.set_tokenizer(CLIPTokenizer())  # what a missing vocabulary silently gives
    vision, text = tiny_blip_configs()
    with pytest.raises(ValueError, match="has 15 tokens but the text encoder expects 17"):
        ImageRewardScorer(vision_config=vision, text_config=text).set_tokenizer(tiny_bert_tokenizer(with_blip_tokens=False))


# ---------------------------------------------------------------------------------------------- Hub I/O
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_save_and_load_roundtrip(tmp_path, name):
    model = MAKERS[name]()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "README.md"} <= files
    assert ("tokenizer" in files) == model.tokenizer_required
    loaded = type(model).from_pretrained(tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = _images()
    a, _ = model(images, PROMPTS)
    b, _ = loaded(images, PROMPTS)
    assert torch.equal(a, b)
    assert "trl-gfn" in (tmp_path / "README.md").read_text()


def test_from_pretrained_refuses_incomplete_directories(tmp_path):
    model = make_hps()
    model.save_pretrained(tmp_path)
    # missing tensor -> error naming it (never left at random values)
    state = load_file(tmp_path / "model.safetensors")
    dropped = "clip.vision_model.post_layernorm.weight"
    state.pop(dropped)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 missing key\(s\): clip\.vision_model\.post_layernorm\.weight"):
        HPSv2Scorer.from_pretrained(tmp_path)
    # no weights at all
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        HPSv2Scorer.from_pretrained(tmp_path)
    # no config (the stock mixin would silently build a default, randomly initialised model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AestheticScorer.from_pretrained(empty)
    with pytest.raises(ValueError, match="strict=False is not supported"):
        AestheticScorer.from_pretrained(tmp_path, strict=False)


def test_from_pretrained_names_a_truncated_weights_file_and_refuses_non_finite_weights(tmp_path):
    from trl_gfn.weights_io import WeightsFileError

    model = MAKERS["aesthetic"]()
    model.save_pretrained(tmp_path / "nan")
    state = load_file(tmp_path / "nan" / "model.safetensors")
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, tmp_path / "nan" / "model.safetensors")
    with pytest.raises(WeightsFileError, match=r"AestheticScorer weights: .*model\.safetensors holds non-finite values"):
        AestheticScorer.from_pretrained(tmp_path / "nan")
    model.save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightsFileError, match=r"AestheticScorer weights: .*cut.model\.safetensors is not a readable safetensors file"):
        AestheticScorer.from_pretrained(tmp_path / "cut")


def test_from_pretrained_refuses_missing_or_empty_tokenizer(tmp_path):
    import shutil

    make_pick().save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer/ folder"):
        PickScoreScorer.from_pretrained(tmp_path)
    CLIPTokenizer().save_pretrained(tmp_path / "tokenizer")  # an "empty" tokenizer, as offline loading can give
    with pytest.raises(ValueError, match="has 2 tokens"):
        PickScoreScorer.from_pretrained(tmp_path)


def test_unexpected_key_raises(tmp_path):
    make_aesthetic().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["mlp.layers.9.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected key\(s\): mlp\.layers\.9\.weight"):
        AestheticScorer.from_pretrained(tmp_path)


def test_config_json_is_complete(tmp_path):
    make_imagereward().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["max_length"] == 35 and config["head_hidden_dims"] == [20, 10, 8, 4]
    assert config["text_config"]["encoder_hidden_size"] == 32 and config["text_config"]["is_decoder"] is True
    assert config["score_mean"] == pytest.approx(0.16717362830052426)


def test_push_to_hub_uploads_weights_config_and_tokenizer(tmp_path, monkeypatch):
    import huggingface_hub.hub_mixin as hub_mixin

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            class R:
                pass

            r = R()
            r.repo_id = repo_id
            return r

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded["repo"] = repo_id
            uploaded["files"] = sorted(str(p.relative_to(folder_path)) for p in folder_path.rglob("*") if p.is_file())
            return "https://huggingface.co/fake/commit"

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    make_hps().push_to_hub("me/tiny-hps")
    assert uploaded["repo"] == "me/tiny-hps"
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded["files"])
    assert any(f.startswith("tokenizer/") for f in uploaded["files"])


# ---------------------------------------------------------------------------------------------- composites & wrappers
def test_callable_reward_wraps_plain_functions():
    def brightness(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))

    wrapped = CallableReward(brightness)
    images = _images().requires_grad_(True)
    rewards, md = validate_rewards(wrapped(images, PROMPTS, [{}, {}]), 2, need_grad=True)
    assert torch.allclose(rewards, images.mean(dim=(1, 2, 3))) and md == {}
    # a list-returning (numpy-style) function is accepted and converted, and declared non-differentiable
    plain = CallableReward(lambda im, p, m: [1.0, 2.0], differentiable=False, name="const")
    assert plain(images, PROMPTS, [{}, {}])[0].tolist() == [1.0, 2.0] and plain.differentiable is False
    with pytest.raises(ValueError, match=r"reward 'bad' returned rewards of shape \(3,\)"):
        CallableReward(lambda im, p, m: torch.zeros(3), name="bad")(images, PROMPTS, [{}, {}])
    with pytest.raises(TypeError, match="needs a callable"):
        CallableReward(3)


def test_composite_reward_sums_and_logs_terms():
    aesthetic = make_aesthetic()
    comp = CompositeReward(
        {"aesthetic": aesthetic, "bright": lambda im, p, m: im.mean(dim=(1, 2, 3))}, weights={"aesthetic": 2.0, "bright": -0.5}
    )
    images = _images().requires_grad_(True)
    total, md = comp(images, PROMPTS, [{}, {}])
    a, _ = aesthetic(images, PROMPTS)
    expected = 2.0 * a - 0.5 * images.mean(dim=(1, 2, 3))
    assert torch.allclose(total, expected)
    assert torch.allclose(md["reward_aesthetic"], a.detach()) and "reward_bright" in md
    assert not md["reward_aesthetic"].requires_grad
    total.sum().backward()
    assert images.grad.abs().sum() > 0
    assert comp.differentiable
    assert not CompositeReward({"x": CallableReward(lambda i, p, m: [0.0, 0.0], differentiable=False)}).differentiable
    with pytest.raises(ValueError, match=r"unknown terms \['typo'\]"):
        CompositeReward({"a": aesthetic}, weights={"typo": 1.0})


# ---------------------------------------------------------------------------------------------- presets
def test_presets_and_load_reward(tmp_path):
    assert set(REWARD_PRESETS) == {"aesthetic", "hpsv2", "hpsv2.1", "imagereward", "pickscore"}
    assert REWARD_PRESETS["hpsv2.1"] == REWARD_PRESETS["hpsv2"]
    assert REWARD_PRESETS["aesthetic"]["reward_scale"] == 1e4 and REWARD_PRESETS["aesthetic"]["unet_reg_scale"] == 2e3
    assert REWARD_PRESETS["imagereward"]["reward_scale"] == 1e4 and REWARD_PRESETS["imagereward"]["unet_reg_scale"] == 5e3
    assert 1e4 <= REWARD_PRESETS["hpsv2"]["reward_scale"] <= 5e5 and 1e2 <= REWARD_PRESETS["hpsv2"]["unet_reg_scale"] <= 5e3
    assert REWARD_PRESETS["aesthetic"]["flow_head_uses_prompt"] is False
    assert all(REWARD_PRESETS[n]["flow_head_uses_prompt"] for n in ("hpsv2", "imagereward", "pickscore"))
    assert [REWARD_PRESETS[n]["prompts"] for n in ("aesthetic", "hpsv2", "imagereward", "pickscore")] == [
        "simple_animals", "hpdv2", "drawbench", "drawbench"]
    make_aesthetic().save_pretrained(tmp_path)
    assert isinstance(load_reward("aesthetic", str(tmp_path)), AestheticScorer)
    with pytest.raises(ValueError, match="unknown reward 'clip'; known rewards: aesthetic, hpsv2, hpsv2.1, imagereward, pickscore"):
        load_reward("clip")
    with pytest.raises(FileNotFoundError):
        load_reward("hpsv2", str(tmp_path / "nowhere"), local_files_only=True)
    with pytest.raises(ValueError, match="cannot be combined with pretrained_model_name_or_path"):
        load_reward("aesthetic", str(tmp_path), source_dir=str(tmp_path))
