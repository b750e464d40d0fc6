"""The bundled digits pipeline and digit-classifier reward load offline and behave as documented."""

import json
import os
from pathlib import Path

import pytest
import torch

from trl_gfn.assets import BUNDLED_DIGIT_CLASSIFIER, BUNDLED_DIGITS_MODEL
from trl_gfn.rewards.base import validate_rewards
from trl_gfn.rewards.digits import DigitClassifier, DigitClassifierReward, parse_digit


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = StableDiffusionPipeline.from_pretrained(BUNDLED_DIGITS_MODEL, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def reward08():
    return DigitClassifierReward.from_pretrained(BUNDLED_DIGIT_CLASSIFIER, target_digits=[0, 8])


def test_bundled_pipeline_layout_and_size():
    root = Path(BUNDLED_DIGITS_MODEL)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]:
        assert (root / sub).is_dir(), sub
    weights = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
    assert weights < 6 * 2**20, weights


def test_bundled_pipeline_tokenizer(pipe):
    tok = pipe.tokenizer
    assert len(tok) == pipe.text_encoder.config.vocab_size
    ids = tok("a handwritten digit 3").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "3</w>", "<|endoftext|>"]
    digit_ids = [tok(f"a handwritten digit {d}").input_ids[4] for d in range(10)]
    assert len(set(digit_ids)) == 10
    assert tok.unk_token_id not in digit_ids or tok.unk_token_id is None


def test_bundled_pipeline_samples(pipe):
    g = torch.Generator().manual_seed(0)
    out = pipe(["a handwritten digit 3", "a handwritten digit"], num_inference_steps=4, guidance_scale=3.0, output_type="pt", generator=g).images
    assert out.shape == (2, 3, 16, 16)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_classifier_loads_and_both_classes_agree(reward08):
    clf = DigitClassifier.from_pretrained(BUNDLED_DIGIT_CLASSIFIER)
    x = torch.rand(5, 3, 16, 16)
    torch.testing.assert_close(clf.logits(x), reward08.logits(x))
    assert clf.features(x).shape == (5, clf.feature_dim)
    assert clf(torch.rand(2, 3, 28, 40)).shape == (2, 10)  # any size, resized inside


def test_classifier_recognises_real_digits():
    from sklearn.datasets import load_digits

    clf = DigitClassifier.from_pretrained(BUNDLED_DIGIT_CLASSIFIER)
    data = load_digits()
    x = torch.tensor(data.images[:300], dtype=torch.float32).unsqueeze(1) / 16
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    with torch.no_grad():
        acc = (clf(x).argmax(-1).numpy() == data.target[:300]).mean()
    assert acc > 0.97


def test_reward_contract_and_gradients(reward08):
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    rewards, meta = validate_rewards(reward08(x, ["a handwritten digit"] * 4, [{}] * 4), 4, need_grad=True)
    assert rewards.dtype == torch.float32 and torch.isfinite(rewards).all() and (rewards <= 0).all()
    rewards.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert not any(p.requires_grad for p in reward08.parameters())
    reward08.train()
    assert not reward08.training  # dropout stays off


def test_reward_is_log_prob_of_set(reward08):
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        p = torch.softmax(reward08.logits(x), -1)
        r, _ = reward08(x)
    torch.testing.assert_close(r, torch.log(p[:, 0] + p[:, 8]))
    full = DigitClassifierReward.from_pretrained(BUNDLED_DIGIT_CLASSIFIER, target_digits=range(10))
    torch.testing.assert_close(full(x)[0], torch.zeros(6), atol=1e-6, rtol=0)


def test_prompt_aware(reward08):
    pa = DigitClassifierReward.from_pretrained(BUNDLED_DIGIT_CLASSIFIER, prompt_aware=True)
    x = torch.rand(3, 3, 16, 16)
    prompts = ["a handwritten digit 3", "A handwritten digit seven", "whatever"]
    r, _ = pa(x, prompts, [{}, {}, {"digit": 1}])
    with torch.no_grad():
        logp = torch.log_softmax(pa.logits(x), -1)
    torch.testing.assert_close(r, torch.stack([logp[0, 3], logp[1, 7], logp[2, 1]]))
    assert parse_digit("a handwritten digit 0") == 0
    for bad in ["a handwritten digit", "digits 3 and 5", "a handwritten digit 12"]:
        with pytest.raises(ValueError):
            parse_digit(bad)
    with pytest.raises(ValueError, match="names no digit"):
        pa(x[:1], ["a handwritten digit"])


def test_reward_construction_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        DigitClassifierReward()
    with pytest.raises(ValueError, match="exactly one"):
        DigitClassifierReward(target_digits=[1], prompt_aware=True)
    with pytest.raises(ValueError):
        DigitClassifierReward(target_digits=[10])
    with pytest.raises(FileNotFoundError):
        DigitClassifierReward.from_pretrained(tmp_path, target_digits=[0])
    with pytest.raises(FileNotFoundError):
        DigitClassifier.from_pretrained(tmp_path)


def test_reward_save_load_roundtrip(tmp_path, reward08):
    reward08.save_pretrained(tmp_path)
    again = DigitClassifierReward.from_pretrained(tmp_path)
    assert again.target_digits == [0, 8] and not again.prompt_aware
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(again(x)[0], reward08(x)[0])


def test_reward_config_roundtrip_normalises_targets(tmp_path):
    r = DigitClassifierReward.from_pretrained(BUNDLED_DIGIT_CLASSIFIER, target_digits=range(10))
    r.save_pretrained(tmp_path)
    assert DigitClassifierReward.from_pretrained(tmp_path).target_digits == list(range(10))
