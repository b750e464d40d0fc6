"""``load_reward(name)`` from the authors' official checkpoints: fetched, converted once, cached, reused.

Tiny stand-ins with the official file names and key layouts are served from a pre-filled Hugging Face cache
(and the HF assets cache for the GitHub-hosted aesthetic head) or from a local ``source_dir``; the code path is
the one a user with Hub access takes (``hf_hub_download`` finds the files in the cache instead of downloading).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from test_rewards_convert import MED_CONFIG, RefBLIPViT, RefImageReward, RefMedBert, RefOpenCLIP, _images, _randomize
from test_rewards_fixtures import tiny_aesthetic_vision_config, tiny_bert_tokenizer, tiny_clip_config, tiny_clip_tokenizer
from torch import nn
from transformers import CLIPConfig, CLIPModel

from trl_gfn.rewards import REWARD_CLASSES, load_reward
from trl_gfn.rewards import official
from trl_gfn.rewards.convert import convert_aesthetic, convert_hpsv2, convert_imagereward, convert_pickscore
from trl_gfn.rewards.official import OFFICIAL_REWARDS, OfficialCheckpointError, converted_path, download_path

PROMPTS = ["a red cat", "a photo of the blue car"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_file(cache: str, repo: str, filename: str, writer) -> str:
    """Put a file where ``hf_hub_download`` looks for it in ``cache`` (refs/main -> snapshots/<commit>/)."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(COMMIT)
    path = os.path.join(root, "snapshots", COMMIT, filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer(path)
    return path


def _save_folder(cache: str, repo: str, save) -> None:
    """``save(tmp)`` (save_pretrained) and copy every file it wrote into the cache entry of ``repo``."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp()
    save(tmp)
    for name in os.listdir(tmp):
        _hub_file(cache, repo, name, lambda p, n=name: shutil.copy(os.path.join(tmp, n), p))


def _tiny_openclip_state(seed):
    ref = _randomize(RefOpenCLIP(width=64, heads=1, hidden=48, v_width=64, out=16), seed).eval()  # head width 64 as in OpenCLIP
    with torch.no_grad():
        ref.logit_scale.fill_(math.log(100.0))
    return {"state_dict": ref.state_dict()}


def _tiny_imagereward_state(seed):
    ref = RefImageReward()
    ref.blip.visual_encoder = RefBLIPViT(d=64, heads=1)  # BLIP's head width is 64
    ref.blip.text_encoder = RefMedBert(enc_width=64)
    ref.blip.vision_proj = nn.Linear(64, 8)
    return _randomize(ref, seed).state_dict()


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Every official file, tiny, in a pre-filled HF cache; the aesthetic head's bytes to serve separately."""
    cache = str(tmp_path_factory.mktemp("hf-cache"))
    clip = _randomize(CLIPModel(CLIPConfig(text_config=tiny_clip_config()["text_config"], vision_config=tiny_aesthetic_vision_config(),
                                           projection_dim=16)), 1)
    _save_folder(cache, official.CLIP_L14_REPO, clip.save_pretrained)
    for seed, (name, filename) in enumerate([("hpsv2", "HPS_v2_compressed.pt"), ("hpsv2.1", "HPS_v2.1_compressed.pt")]):
        _hub_file(cache, official.HPS_REPO, filename, lambda p, s=seed: torch.save(_tiny_openclip_state(s + 2), p))
    _save_folder(cache, official.OPENCLIP_H14_REPO, tiny_clip_tokenizer().save_pretrained)
    _hub_file(cache, official.IMAGEREWARD_REPO, "ImageReward.pt", lambda p: torch.save(_tiny_imagereward_state(4), p))
    med = dict(MED_CONFIG, encoder_width=64)
    _hub_file(cache, official.IMAGEREWARD_REPO, "med_config.json", lambda p: open(p, "w").write(json.dumps(med)))
    _save_folder(cache, official.BERT_REPO, tiny_bert_tokenizer(with_blip_tokens=False).save_pretrained)
    pick = _randomize(CLIPModel(CLIPConfig.from_dict(dict(tiny_clip_config(), projection_dim=16))), 5)
    with torch.no_grad():
        pick.logit_scale.fill_(math.log(100.0))
    _save_folder(cache, official.PICKSCORE_REPO, pick.save_pretrained)
    _save_folder(cache, official.PICKSCORE_REPO, tiny_clip_tokenizer().save_pretrained)
    head = _randomize(nn.Sequential(nn.Linear(16, 24), nn.Dropout(0.2), nn.Linear(24, 12), nn.Dropout(0.2), nn.Linear(12, 8),
                                    nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1)), 7)
    head_file = os.path.join(cache, "aesthetic-head.pth")
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, head_file)
    return cache, head_file


def _snapshot(cache, repo, filename=""):
    return os.path.join(cache, "models--" + repo.replace("/", "--"), "snapshots", COMMIT, filename)


@pytest.fixture
def pinned_to_stand_in(stand_ins, monkeypatch):
    """The aesthetic head is pinned by SHA-256 and size; pin the stand-in's instead (the same check runs)."""
    _, head_file = stand_ins
    spec = OFFICIAL_REWARDS["aesthetic"]
    (real,) = spec.files["head"]
    fake = dataclasses.replace(real, sha256=official.sha256_of_file(head_file), size=os.path.getsize(head_file))
    monkeypatch.setitem(OFFICIAL_REWARDS, "aesthetic", dataclasses.replace(spec, files={**spec.files, "head": (fake,)}))
    return fake


def _direct(name, cache, head_file):
    """The same reward converted by calling the converter on the official files by hand."""
    from transformers import BertTokenizer, CLIPTokenizer

    if name == "aesthetic":
        return convert_aesthetic(head_file, _snapshot(cache, official.CLIP_L14_REPO))
    if name.startswith("hpsv2"):
        filename = "HPS_v2_compressed.pt" if name == "hpsv2" else "HPS_v2.1_compressed.pt"
        return convert_hpsv2(_snapshot(cache, official.HPS_REPO, filename), CLIPTokenizer.from_pretrained(_snapshot(cache, official.OPENCLIP_H14_REPO)),
                             version="v2.0" if name == "hpsv2" else "v2.1")
    if name == "imagereward":
        return convert_imagereward(_snapshot(cache, official.IMAGEREWARD_REPO, "ImageReward.pt"), _snapshot(cache, official.IMAGEREWARD_REPO, "med_config.json"),
                                   BertTokenizer.from_pretrained(_snapshot(cache, official.BERT_REPO)))
    return convert_pickscore(_snapshot(cache, official.PICKSCORE_REPO), CLIPTokenizer.from_pretrained(_snapshot(cache, official.PICKSCORE_REPO)))


def test_every_reward_converts_from_the_hf_cache_once_then_reuses_it(stand_ins, pinned_to_stand_in, tmp_path):
    cache, head_file = stand_ins
    assets = str(tmp_path / "assets")
    head_path = download_path(pinned_to_stand_in, "aesthetic", assets)  # the GitHub file, as a finished download leaves it
    os.makedirs(os.path.dirname(head_path))
    with open(head_file, "rb") as src, open(head_path, "wb") as dst:
        dst.write(src.read())
    images = _images()
    for name in ("aesthetic", "hpsv2", "hpsv2.1", "imagereward", "pickscore"):
        reward = load_reward(name, cache_dir=cache, reward_cache_dir=assets, local_files_only=True)
        assert type(reward) is REWARD_CLASSES[name]
        with torch.no_grad():
            got, _ = reward(images, PROMPTS)
            expected, _ = _direct(name, cache, head_file)(images, PROMPTS)
        assert torch.allclose(got, expected, atol=1e-6), name
        folder = converted_path(name, assets)
        manifest = json.loads(open(os.path.join(folder, official.MANIFEST_NAME)).read())
        assert manifest["reward"] == name and manifest["converter_version"] == official.CONVERTER_VERSION
        first = next(iter(manifest["sources"].values()))
        assert all("url" in v for v in first.values())
    hps = json.loads(open(os.path.join(converted_path("hpsv2.1", assets), official.MANIFEST_NAME)).read())
    assert hps["sources"]["checkpoint"]["HPS_v2.1_compressed.pt"]["commit"] == COMMIT
    assert getattr(load_reward("hpsv2", cache_dir=cache, reward_cache_dir=assets, local_files_only=True), "version") == "v2.0"
    # reuse: with no official file reachable at all, the cached conversions still load and score the same
    for name in ("aesthetic", "pickscore"):
        again = load_reward(name, cache_dir=str(tmp_path / "empty-hf-cache"), reward_cache_dir=assets, local_files_only=True)
        with torch.no_grad():
            assert torch.equal(again(images, PROMPTS)[0], load_reward(name, converted_path(name, assets))(images, PROMPTS)[0])


def test_source_dir_and_the_errors_that_name_the_file(stand_ins, pinned_to_stand_in, tmp_path):
    import shutil

    cache, head_file = stand_ins
    src = tmp_path / "official"
    for repo, files in [(official.HPS_REPO, ["HPS_v2.1_compressed.pt"]), (official.OPENCLIP_H14_REPO, os.listdir(_snapshot(cache, official.OPENCLIP_H14_REPO)))]:
        (src / repo).mkdir(parents=True)
        for f in files:
            shutil.copy(_snapshot(cache, repo, f), src / repo / f)
    reward = load_reward("hpsv2.1", source_dir=str(src), reward_cache_dir=str(tmp_path / "a"))
    assert reward.version == "v2.1"
    # a required file missing from the folder, and from an HF cache: the error names it
    with pytest.raises(OfficialCheckpointError, match=r"HPS_v2_compressed\.pt.*<owner>/<repo>/<filename>"):
        load_reward("hpsv2", source_dir=str(src), reward_cache_dir=str(tmp_path / "b"))
    with pytest.raises(OfficialCheckpointError, match=r"ImageReward\.pt of hub:THUDM/ImageReward@main: not in the Hugging Face cache"):
        load_reward("imagereward", cache_dir=str(tmp_path / "empty"), reward_cache_dir=str(tmp_path / "b"), local_files_only=True)
    # an incomplete checkpoint: the converter names the file and the key; nothing is cached
    state = torch.load(src / official.HPS_REPO / "HPS_v2.1_compressed.pt", weights_only=True)
    del state["state_dict"]["transformer.resblocks.1.ln_2.bias"]
    torch.save(state, src / official.HPS_REPO / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match=r"HPS_v2\.1_compressed\.pt: missing key 'transformer\.resblocks\.1\.ln_2\.bias'"):
        load_reward("hpsv2.1", source_dir=str(src), reward_cache_dir=str(tmp_path / "c"))
    assert not os.path.exists(converted_path("hpsv2.1", str(tmp_path / "c")))
    # a file that is not the pinned official one
    bad = src / official.AESTHETIC_REPO / pinned_to_stand_in.filename
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the head")
    with pytest.raises(OfficialCheckpointError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth: 12 bytes, the official"):
        load_reward("aesthetic", source_dir=str(src), reward_cache_dir=str(tmp_path / "d"))
    # an incomplete cached conversion is reported and rebuilt
    os.remove(os.path.join(converted_path("hpsv2.1", str(tmp_path / "a")), "model.safetensors"))
    shutil.copy(_snapshot(cache, official.HPS_REPO, "HPS_v2.1_compressed.pt"), src / official.HPS_REPO / "HPS_v2.1_compressed.pt")
    with pytest.warns(UserWarning, match=r"model\.safetensors is missing.*converting the official files again"):
        load_reward("hpsv2.1", source_dir=str(src), reward_cache_dir=str(tmp_path / "a"))


def test_the_official_aesthetic_head_is_pinned_to_its_github_file():
    """The pin is the file in christophschuhmann/improved-aesthetic-predictor (3,714,759 bytes at the pinned commit)."""
    (spec,) = OFFICIAL_REWARDS["aesthetic"].files["head"]
    assert spec.host == "github" and spec.repo == "christophschuhmann/improved-aesthetic-predictor" and len(spec.revision) == 40
    assert spec.url == ("https://raw.githubusercontent.com/christophschuhmann/improved-aesthetic-predictor/"
                        f"{spec.revision}/sac%2Blogos%2Bava1-l14-linearMSE.pth")
    assert spec.size == 3714759 and len(spec.sha256) == 64
    with pytest.raises(ValueError, match="rewards with official checkpoints: aesthetic, hpsv2, hpsv2.1, imagereward, pickscore"):
        official.official_reward("clip")


def test_trls_aesthetic_scorer_import_path_builds_the_same_reward(stand_ins):
    """``trl_gfn.models.auxiliary_modules.aesthetic_scorer`` (TRL's import path): TRL's head file on the Hub + CLIP ViT-L/14."""
    import shutil

    from trl_gfn.models.auxiliary_modules import TRL_AESTHETIC_MODEL_FILENAME, TRL_AESTHETIC_MODEL_ID, aesthetic_scorer

    cache, head_file = stand_ins
    _hub_file(cache, TRL_AESTHETIC_MODEL_ID, TRL_AESTHETIC_MODEL_FILENAME, lambda p: shutil.copy(head_file, p))
    reward = aesthetic_scorer(TRL_AESTHETIC_MODEL_ID, TRL_AESTHETIC_MODEL_FILENAME, cache_dir=cache, local_files_only=True)
    images = _images().requires_grad_(True)
    scores, metadata = reward(images, PROMPTS, [{}, {}])
    assert metadata == {} and torch.allclose(scores, _direct("aesthetic", cache, head_file)(images)[0])
    scores.sum().backward()  # differentiable, as AlignProp needs
    assert images.grad.abs().sum() > 0
    with pytest.raises(OfficialCheckpointError, match="missing.pth of hub:trl-lib/ddpo-aesthetic-predictor"):
        aesthetic_scorer(TRL_AESTHETIC_MODEL_ID, "missing.pth", cache_dir=cache, local_files_only=True)
