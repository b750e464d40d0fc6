"""Rewards from their authors' own checkpoints: download on first use, convert, cache, reuse.

``load_reward("aesthetic" | "hpsv2" | "hpsv2.1" | "imagereward" | "pickscore")`` needs nothing published by
this project: each reward lists the files its authors host (:data:`OFFICIAL_REWARDS`), they are fetched
into the Hugging Face cache (``hf_hub_download``; the aesthetic head, which lives in a GitHub repository,
into the HF assets cache after a SHA-256 check), converted once with :mod:`trl_gfn.rewards.convert` and
saved with ``save_pretrained`` into the assets cache (or a folder the user names). Later calls load the
converted folder directly (strict loader, no download).

The files can also be served from a local folder laid out as ``<owner>/<repo>/<filename>``
(``source_dir=``), e.g. for machines without Hub access. A missing file, a file that fails its checksum or
a checkpoint the converter does not understand raises an error naming the file; nothing falls back to
random weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from ..weights_io import sha256_of_file
from .base import RewardModel

#: bump when a converter changes what it writes: converted folders of older versions are not reused
CONVERTER_VERSION = 1
#: written last into a converted folder: what it was made from and the size of every file
MANIFEST_NAME = "trl_gfn_conversion.json"
LIBRARY_NAME = "trl-gfn"


@dataclass(frozen=True)
class OfficialFile:
    """One file of an official checkpoint.

    ``repo`` is ``owner/name`` on the Hub (``host="hub"``) or on GitHub (``host="github"``, then ``sha256``
    and ``size`` pin the content, since GitHub has no cache of its own). ``required=False`` marks files a
    loader can do without (e.g. a tokenizer's ``special_tokens_map.json``).
    """

    repo: str
    filename: str
    host: str = "hub"
    revision: str = "main"
    required: bool = True
    sha256: str | None = None
    size: int | None = None

    @property
    def url(self) -> str:
        if self.host == "hub":
            return f"https://huggingface.co/{self.repo}/blob/{self.revision}/{self.filename}"
        quoted = self.filename.replace("+", "%2B")
        return f"https://raw.githubusercontent.com/{self.repo}/{self.revision}/{quoted}"

    def describe(self) -> str:
        return f"{self.filename} of {self.host}:{self.repo}@{self.revision}"


@dataclass(frozen=True)
class OfficialReward:
    """Where a reward's official files live and how they become a trl-gfn reward module.

    ``files`` maps a role (an argument of ``convert``) to the files of that role: one file, or the files of a
    folder (a transformers model or tokenizer) that ``convert`` receives as a directory.
    """

    name: str
    reward_class: str
    files: dict[str, tuple[OfficialFile, ...]]
    folders: tuple[str, ...] = ()
    convert: Callable[..., RewardModel] | None = field(default=None, compare=False)
    citation: str = ""


def _tokenizer_files(repo: str, *, bpe: bool) -> tuple[OfficialFile, ...]:
    vocab = ("vocab.json", "merges.txt") if bpe else ("vocab.txt",)
    return (OfficialFile(repo, "tokenizer_config.json"), OfficialFile(repo, "tokenizer.json", required=False),
            OfficialFile(repo, "special_tokens_map.json", required=False),
            *(OfficialFile(repo, name, required=False) for name in vocab))


def _convert_aesthetic(head: str, clip: str):
    from .convert import convert_aesthetic

    return convert_aesthetic(head, clip)


def _tokenizer(cls_name: str, folder: str):
    """Load a tokenizer folder with its class named (the repos' ``tokenizer_config.json`` need not name it)."""
    import transformers

    return getattr(transformers, cls_name).from_pretrained(folder)


def _convert_hps(version: str):
    def convert(checkpoint: str, tokenizer: str):
        from .convert import convert_hpsv2

        return convert_hpsv2(checkpoint, _tokenizer("CLIPTokenizer", tokenizer), version=version)

    return convert


def _convert_imagereward(checkpoint: str, med_config: str, tokenizer: str):
    from .convert import convert_imagereward

    return convert_imagereward(checkpoint, med_config, _tokenizer("BertTokenizer", tokenizer))


def _convert_pickscore(model: str, tokenizer: str):
    from .convert import convert_pickscore

    return convert_pickscore(model, _tokenizer("CLIPTokenizer", tokenizer))


AESTHETIC_REPO = "christophschuhmann/improved-aesthetic-predictor"
#: the commit of the GitHub repository whose ``sac+logos+ava1-l14-linearMSE.pth`` is pinned below
AESTHETIC_COMMIT = "6934dd81792f086e613a121dbce43082cb8be85e"
CLIP_L14_REPO = "openai/clip-vit-large-patch14"
HPS_REPO = "xswu/HPSv2"
OPENCLIP_H14_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
IMAGEREWARD_REPO = "THUDM/ImageReward"
BERT_REPO = "google-bert/bert-base-uncased"
PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"


def _hps(version: str, filename: str) -> OfficialReward:
    return OfficialReward(
        name="hpsv2" if version == "v2.0" else "hpsv2.1", reward_class="HPSv2Scorer", folders=("tokenizer",),
        files={"checkpoint": (OfficialFile(HPS_REPO, filename),), "tokenizer": _tokenizer_files(OPENCLIP_H14_REPO, bpe=True)},
        convert=_convert_hps(version))


OFFICIAL_REWARDS: dict[str, OfficialReward] = {
    "aesthetic": OfficialReward(
        name="aesthetic", reward_class="AestheticScorer", folders=("clip",),
        files={"head": (OfficialFile(AESTHETIC_REPO, "sac+logos+ava1-l14-linearMSE.pth", host="github", revision=AESTHETIC_COMMIT,
                                     sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0", size=3714759),),
               "clip": (OfficialFile(CLIP_L14_REPO, "config.json"), OfficialFile(CLIP_L14_REPO, "model.safetensors"))},
        convert=_convert_aesthetic),
    "hpsv2": _hps("v2.0", "HPS_v2_compressed.pt"),
    "hpsv2.1": _hps("v2.1", "HPS_v2.1_compressed.pt"),
    "imagereward": OfficialReward(
        name="imagereward", reward_class="ImageRewardScorer", folders=("tokenizer",),
        files={"checkpoint": (OfficialFile(IMAGEREWARD_REPO, "ImageReward.pt"),),
               "med_config": (OfficialFile(IMAGEREWARD_REPO, "med_config.json"),),
               "tokenizer": _tokenizer_files(BERT_REPO, bpe=False)},
        convert=_convert_imagereward),
    "pickscore": OfficialReward(
        name="pickscore", reward_class="PickScoreScorer", folders=("model", "tokenizer"),
        files={"model": (OfficialFile(PICKSCORE_REPO, "config.json"), OfficialFile(PICKSCORE_REPO, "model.safetensors")),
               "tokenizer": _tokenizer_files(PICKSCORE_REPO, bpe=True)},
        convert=_convert_pickscore),
}


class OfficialCheckpointError(FileNotFoundError):
    """An official file that cannot be had (absent, offline and not cached, or failing its checksum); names the file."""


# ---------------------------------------------------------------------------------------------- fetching
def fetch_file(spec: OfficialFile, *, source_dir: str | None = None, cache_dir: str | None = None, assets_dir: str | None = None,
               local_files_only: bool = False, token: str | bool | None = None, namespace: str = "files") -> str | None:
    """Local path of ``spec``: from ``source_dir/<repo>/<filename>``, the HF cache, or a download.

    Returns None for an optional file that does not exist; raises :class:`OfficialCheckpointError` naming the
    file otherwise.
    """
    if source_dir is not None:
        path = os.path.join(source_dir, *spec.repo.split("/"), spec.filename)
        if os.path.isfile(path):
            _check_pinned(spec, path)
            return path
        if not spec.required:
            return None
        raise OfficialCheckpointError(f"{path}: missing; source_dir must hold the official files as <owner>/<repo>/<filename> "
                                      f"({spec.describe()}, {spec.url})")
    if spec.host == "hub":
        return _fetch_hub(spec, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    return _fetch_url(spec, assets_dir=assets_dir, namespace=namespace, local_files_only=local_files_only)


def _offline(local_files_only: bool) -> bool:
    from huggingface_hub import constants

    return local_files_only or bool(constants.HF_HUB_OFFLINE)


def _fetch_hub(spec: OfficialFile, *, cache_dir, local_files_only, token) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(spec.repo, spec.filename, revision=spec.revision, cache_dir=cache_dir,
                               local_files_only=local_files_only, token=token)
    except LocalEntryNotFoundError as err:
        if not spec.required:
            return None
        raise OfficialCheckpointError(
            f"{spec.describe()}: not in the Hugging Face cache and the Hub cannot be reached (offline or local_files_only). "
            f"Download it once with `hf download {spec.repo} {spec.filename}`, or pass source_dir= with the file at "
            f"<source_dir>/{spec.repo}/{spec.filename}") from err
    except RepositoryNotFoundError as err:
        raise OfficialCheckpointError(f"{spec.describe()}: the repository {spec.repo} cannot be accessed ({err})") from err
    except EntryNotFoundError as err:
        if not spec.required:
            return None
        raise OfficialCheckpointError(f"{spec.describe()}: no such file in the repository") from err
    except (HfHubHTTPError, OSError) as err:
        raise OfficialCheckpointError(f"{spec.describe()}: could not be downloaded ({type(err).__name__}: {err})") from err


def download_path(spec: OfficialFile, namespace: str, assets_dir: str | None = None) -> str:
    """Where a file that is not on the Hub (``host="github"``) is kept once downloaded (the HF assets cache)."""
    from huggingface_hub import cached_assets_path

    folder = cached_assets_path(LIBRARY_NAME, namespace=namespace, subfolder="downloaded", assets_dir=assets_dir)
    return os.path.join(folder, *spec.repo.split("/"), spec.revision, spec.filename)


def _fetch_url(spec: OfficialFile, *, assets_dir, namespace, local_files_only) -> str:
    path = download_path(spec, namespace, assets_dir)
    if os.path.isfile(path):
        _check_pinned(spec, path)
        return path
    if _offline(local_files_only):
        raise OfficialCheckpointError(
            f"{spec.describe()}: not cached at {path} and downloads are off (offline or local_files_only). Download "
            f"{spec.url} to that path, or pass source_dir= with the file at <source_dir>/{spec.repo}/{spec.filename}")
    import urllib.request

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=60) as response:  # noqa: S310 - fixed https URL
            shutil.copyfileobj(response, out)
        _check_pinned(spec, tmp, shown=spec.url)
        os.replace(tmp, path)
    except OSError as err:
        raise OfficialCheckpointError(f"{spec.describe()}: could not be downloaded from {spec.url} ({err})") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _check_pinned(spec: OfficialFile, path: str, shown: str | None = None) -> None:
    if spec.size is not None and os.path.getsize(path) != spec.size:
        raise OfficialCheckpointError(f"{shown or path}: {os.path.getsize(path)} bytes, the official {spec.filename} has {spec.size} "
                                      "(truncated or another file)")
    if spec.sha256 is not None and sha256_of_file(path) != spec.sha256:
        raise OfficialCheckpointError(f"{shown or path}: its SHA-256 differs from the official {spec.filename}'s ({spec.sha256})")



# ---------------------------------------------------------------------------------------------- converting and caching
def conversion_key(reward: OfficialReward) -> str:
    """Name of the converted folder: the converter version and a digest of the official files it is made from."""
    spec = [[role, [[f.host, f.repo, f.revision, f.filename, f.sha256] for f in files]] for role, files in sorted(reward.files.items())]
    digest = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]
    return f"v{CONVERTER_VERSION}-{digest}"


def converted_path(name: str, reward_cache_dir: str | None = None) -> str:
    """Where the converted reward ``name`` is (or will be) cached."""
    from huggingface_hub import cached_assets_path

    reward = official_reward(name)
    folder = cached_assets_path(LIBRARY_NAME, namespace=name, subfolder="converted", assets_dir=reward_cache_dir)
    return os.path.join(folder, conversion_key(reward))


def official_reward(name: str) -> OfficialReward:
    if name not in OFFICIAL_REWARDS:
        raise ValueError(f"unknown reward {name!r}; rewards with official checkpoints: {', '.join(OFFICIAL_REWARDS)}")
    return OFFICIAL_REWARDS[name]


def ensure_converted(name: str, *, reward_cache_dir: str | None = None, source_dir: str | None = None, cache_dir: str | None = None,
                     local_files_only: bool = False, token: str | bool | None = None) -> str:
    """The folder of the converted reward ``name``, converting the official files first if it is not cached.

    A cached folder is reused when its manifest lists every file with its size; one that does not (an
    interrupted or altered conversion) is reported with a warning and converted again.
    """
    reward = official_reward(name)
    target = converted_path(name, reward_cache_dir)
    problem = _cache_problem(target)
    if problem is None:
        return target
    if os.path.exists(target):
        warnings.warn(f"converted {name} reward at {target} is incomplete ({problem}); converting the official files again",
                      UserWarning, stacklevel=2)
    paths, sources = {}, {}
    for role, files in reward.files.items():
        got = {f.filename: fetch_file(f, source_dir=source_dir, cache_dir=cache_dir, assets_dir=reward_cache_dir, local_files_only=local_files_only,
                                      token=token, namespace=name) for f in files}
        present = {k: v for k, v in got.items() if v is not None}
        sources[role] = {f.filename: _provenance(f, present[f.filename]) for f in files if f.filename in present}
        if role in reward.folders:
            paths[role] = _as_folder(role, present, reward, target)
        else:
            (paths[role],) = present.values()
    model = reward.convert(**paths)
    _publish(model, target, {"reward": name, "class": reward.reward_class, "converter_version": CONVERTER_VERSION, "sources": sources})
    return target


def _provenance(spec: OfficialFile, path: str | None) -> dict[str, Any]:
    out = {"url": spec.url, "revision": spec.revision}
    if path is not None and os.sep + "snapshots" + os.sep in path:  # HF cache: record the commit actually used
        out["commit"] = path.split(os.sep + "snapshots" + os.sep, 1)[1].split(os.sep, 1)[0]
    if spec.sha256:
        out["sha256"] = spec.sha256
    return out


def _as_folder(role: str, present: dict[str, str], reward: OfficialReward, target: str) -> str:
    """The directory holding a folder-role's files (they share one HF snapshot folder, or one source_dir folder)."""
    folders = {os.path.dirname(p) for p in present.values()}
    if len(folders) != 1:  # pragma: no cover - files of one repo and revision always land in one snapshot
        raise OfficialCheckpointError(f"{reward.name}: the {role} files are spread over {sorted(folders)}")
    folder = folders.pop()
    if role == "tokenizer" and not any(n in present for n in ("tokenizer.json", "vocab.json", "vocab.txt")):
        expected = [f.filename for f in reward.files[role]]
        raise OfficialCheckpointError(f"{folder}: no tokenizer vocabulary (expected tokenizer.json or the vocabulary files among {expected})")
    return folder


def _cache_problem(target: str) -> str | None:
    manifest = os.path.join(target, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        return f"no {MANIFEST_NAME}" if os.path.exists(target) else "not converted yet"
    try:
        with open(manifest, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {manifest}: {err}"
    for rel, size in files.items():
        path = os.path.join(target, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path)} bytes, the manifest records {size}"
    return None


def _publish(model: RewardModel, target: str, info: dict[str, Any]) -> None:
    """Save into a temporary sibling folder, write the manifest last, then rename into place."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".converting-")
    try:
        model.save_pretrained(tmp)
        files = {}
        for root, _, names in os.walk(tmp):
            for n in names:
                rel = os.path.relpath(os.path.join(root, n), tmp).replace(os.sep, "/")
                files[rel] = os.path.getsize(os.path.join(root, n))
        with open(os.path.join(tmp, MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump({**info, "files": files}, f, indent=1, sort_keys=True)
        if os.path.exists(target):
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if _cache_problem(target) is not None:  # another process did not publish a complete one either
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["CONVERTER_VERSION", "MANIFEST_NAME", "OFFICIAL_REWARDS", "OfficialCheckpointError", "OfficialFile", "OfficialReward",
           "conversion_key", "converted_path", "download_path", "ensure_converted", "fetch_file", "official_reward"]
