"""Start a new run from trained weights (``init_from``): a saved or pushed LoRA, and the extra modules with it.

``resume_from`` continues an interrupted run (weights, optimizer, RNG, counters from a checkpoint);
``init_from`` starts a *new* run whose policy is a LoRA trained before — a ``<run>/final`` folder, a
``checkpoint_N``, any folder or Hub repo holding ``pytorch_lora_weights.safetensors`` in diffusers format —
and, for trainers with extra modules (Nabla-GFlowNet's flow head), the module saved next to it in
``<name>/config.json`` + ``<name>/diffusion_pytorch_model.safetensors``. Everything is read with
safetensors; a file that is missing, damaged or of another shape raises an error naming it.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from ..pipelines.rl_pipeline import LORA_WEIGHT_NAME


def module_files(name: str) -> tuple[str, str]:
    """The files an extra module is saved as (``save_pretrained`` of a diffusers ``ModelMixin``)."""
    from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

    return f"{name}/{CONFIG_NAME}", f"{name}/{SAFETENSORS_WEIGHTS_NAME}"


def is_hub_id(source: str) -> bool:
    """``owner/name`` (optionally ``@revision``) that is not an existing local path."""
    from ..configs.base import HUB_REPO_ID

    repo = source.split("@", 1)[0]
    return not os.path.exists(source) and repo.count("/") == 1 and bool(HUB_REPO_ID.match(repo))


def resolve_weights_source(source: str, module_names: list[str], *, token: str | bool | None = None) -> str:
    """A local folder holding the LoRA (and the modules' files if the source has them) for ``init_from``.

    A Hub id is fetched into the Hugging Face cache (``hf_hub_download``; ``owner/name@revision`` picks a
    revision); modules the repo does not have are simply absent from the returned folder.
    """
    if os.path.isdir(source):
        lora = os.path.join(source, LORA_WEIGHT_NAME)
        if not os.path.isfile(lora):
            hint = next((f" (did you mean {os.path.join(source, sub)}?)" for sub in ("final",)
                         if os.path.isfile(os.path.join(source, sub, LORA_WEIGHT_NAME))), "")
            raise FileNotFoundError(f"init_from: {lora} does not exist{hint}; init_from takes a folder holding {LORA_WEIGHT_NAME} "
                                    "(a <run>/final or checkpoint_N folder) or a Hub repo id")
        from .checkpoints import MANIFEST, verify_checkpoint

        if os.path.isfile(os.path.join(source, MANIFEST)):
            verify_checkpoint(source)  # a checkpoint folder: every file as its manifest records it
        return source
    if not is_hub_id(source):
        raise FileNotFoundError(f"init_from: {source!r} is neither a folder nor a Hub repo id such as 'me/my-lora'")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    repo, _, revision = source.partition("@")
    try:
        lora = hf_hub_download(repo, LORA_WEIGHT_NAME, revision=revision or None, token=token)
    except (EntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(f"init_from: could not get {LORA_WEIGHT_NAME} of the Hub repo {source!r} ({type(err).__name__}: {err})") from err
    for name in module_names:
        for filename in module_files(name):
            try:
                hf_hub_download(repo, filename, revision=revision or None, token=token)
            except (EntryNotFoundError, HfHubHTTPError, OSError) as err:
                if filename.endswith(".json") and _absent_from_repo(err):
                    break  # the Hub says the repo has no such module: init_weights warns
                # offline without the file cached, a network or permission error, or a module with its config but not its
                # weights: never train on from a fresh module as if the repo had none
                raise FileNotFoundError(f"init_from: could not get {filename} of the Hub repo {source!r} "
                                        f"({type(err).__name__}: {err})") from err
    return os.path.dirname(lora)


def _absent_from_repo(err: BaseException) -> bool:
    """Whether a download error means the Hub answered that the file does not exist in the repo (not: offline, not cached,
    unreachable, unauthorised)."""
    from huggingface_hub import errors

    if isinstance(err, errors.LocalEntryNotFoundError):
        return False
    remote = getattr(errors, "RemoteEntryNotFoundError", None)
    if remote is not None:
        return isinstance(err, remote)
    return isinstance(err, errors.EntryNotFoundError)


def load_module(module: torch.nn.Module, folder: str, name: str) -> None:
    """Load ``folder/<name>/`` (config + safetensors) into ``module``; the saved architecture must be ``module``'s."""
    from ..rewards.hub import load_state_dict_strict
    from ..weights_io import read_safetensors

    config_rel, weights_rel = module_files(name)
    config_file = os.path.join(folder, config_rel)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{name}: no file {config_file}")
    with open(config_file, encoding="utf-8") as f:
        saved = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    own = {k: v for k, v in json.loads(module.to_json_string()).items() if not k.startswith("_")}
    differ = {k: (saved.get(k), own.get(k)) for k in set(saved) | set(own) if saved.get(k) != own.get(k)}
    if differ:
        raise ValueError(f"{config_file}: the saved {name} has another architecture than this trainer's (saved vs now: {differ})")
    weights = os.path.join(folder, weights_rel)
    load_state_dict_strict(module, read_safetensors(weights, what=f"{name} weights"), source=weights)


def check_lora_metadata(folder: str, rank: int, alpha: int) -> None:
    """Compare the adapter config diffusers stores in the LoRA file's metadata with the run's (errors name the field)."""
    from safetensors import safe_open

    path = os.path.join(folder, LORA_WEIGHT_NAME)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        warnings.warn(f"init_from: {path} records no adapter config; assuming it was trained with lora_rank={rank}, lora_alpha={alpha} "
                      "(a wrong alpha would change the model's scale silently)", UserWarning, stacklevel=3)
        return
    try:
        saved = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: unreadable lora_adapter_metadata ({err})") from err
    unet = {k[len("unet."):]: v for k, v in saved.items() if k.startswith("unet.")} if isinstance(saved, dict) else {}
    if "r" in unet and int(unet["r"]) != rank:
        raise ValueError(f"lora_rank: {path} holds a rank-{unet['r']} LoRA, the config asks for rank {rank}")
    if "lora_alpha" in unet and float(unet["lora_alpha"]) != float(alpha):
        raise ValueError(f"lora_alpha: {path} was trained with lora_alpha={unet['lora_alpha']}, the config has {alpha}")


__all__ = ["check_lora_metadata", "is_hub_id", "load_module", "module_files", "resolve_weights_source"]
