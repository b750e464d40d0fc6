"""Model cards and Hub upload of a trained run (LoRA in diffusers format, optional extra models).

The card is a :class:`huggingface_hub.ModelCard` whose metadata (:class:`~huggingface_hub.ModelCardData`) the
Hub reads: ``base_model`` (the base model's Hub id; none for a local model), its ``license`` where it is known,
``pipeline_tag: text-to-image``, ``library_name: diffusers`` and tags naming the method and ``trl-gfn``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

#: licenses of base models whose card cannot be read locally; each checked against the model's own card (docs/quickstart.md)
KNOWN_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "stabilityai/stable-diffusion-3-medium-diffusers": "other",
}
#: the name and link the Hub metadata gives a base model's ``license: other``
KNOWN_OTHER_LICENSES = {
    "stabilityai/stable-diffusion-3-medium-diffusers": (
        "stabilityai-ai-community", "https://huggingface.co/stabilityai/stable-diffusion-3-medium/blob/main/LICENSE.md"),
}
#: ``models--owner--name/snapshots/<commit>``: a folder of the Hugging Face cache
_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][0-9a-f]{40}[/\\]?$")


def base_model_hub_id(name_or_path: str) -> str | None:
    """The Hub id of a base model loaded by id, or from its folder in the HF cache; None for any other local folder."""
    if not name_or_path:
        return None
    m = _HF_CACHE_SNAPSHOT.search(os.path.normpath(name_or_path) + os.sep)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    from ..configs.base import HUB_REPO_ID
    from ..configs.public import is_local_path

    if is_local_path(name_or_path) or os.path.exists(name_or_path) or name_or_path.count("/") != 1 or not HUB_REPO_ID.match(name_or_path):
        return None
    return name_or_path


def base_model_license(name_or_path: str, hub_id: str | None) -> str | None:
    """The base model's license: from its model card if it is on disk (its folder, or the HF cache), else :data:`KNOWN_LICENSES`."""
    from huggingface_hub import ModelCard

    candidates = []
    if name_or_path and os.path.isdir(name_or_path):
        candidates.append(os.path.join(name_or_path, "README.md"))
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, "README.md")
        if isinstance(cached, str):
            candidates.append(cached)
    for path in candidates:
        if os.path.isfile(path):
            try:
                license_ = ModelCard.load(path).data.license
            except Exception:  # noqa: BLE001 - an unreadable card just leaves the license unknown
                license_ = None
            if license_:
                return str(license_)
    return KNOWN_LICENSES.get(hub_id or "")


def public_model_name(name_or_path: str) -> str:
    """How a model card names the base model: a Hub id as is, a local directory by its last component only."""
    hub_id = base_model_hub_id(name_or_path)
    if hub_id:
        return hub_id
    if not name_or_path:
        return ""
    return os.path.basename(os.path.normpath(name_or_path)) or "<local model>"


def build_model_card(
    *,
    repo_id: str,
    base_model: str,
    base_model_id: str | None,
    license: str | None,
    method: str,
    method_tag: str,
    paper: str,
    citation: str,
    reward: str,
    config: dict[str, Any],
    key_fields: list[str],
    metrics: dict[str, float],
    prompts: list[str],
    extra_usage: str = "",
    dataset_name: str | None = None,
    tags: list[str] | None = None,
    objective: str | None = None,
    pipeline_class: str = "StableDiffusionPipeline",
):
    """The model card of a trained LoRA: Hub metadata plus method, base model, reward, key config, metrics and loading code.

    ``objective`` replaces "to maximise the reward `<reward>`" for methods trained on something else (preference pairs).
    ``pipeline_class``: the diffusers class of the base model's family, used in the loading code."""
    from huggingface_hub import ModelCard, ModelCardData

    all_tags = list(dict.fromkeys(["trl-gfn", method_tag, "lora", "text-to-image", "diffusers", *(tags or [])]))
    other = KNOWN_OTHER_LICENSES.get(base_model_id or "") if license == "other" else None
    data = ModelCardData(base_model=base_model_id, license=license, library_name="diffusers", pipeline_tag="text-to-image", tags=all_tags,
                         datasets=[dataset_name] if dataset_name else None,
                         **(dict(license_name=other[0], license_link=other[1]) if other else {}))
    base_model = base_model or "<base model>"
    base_link = f"[`{base_model}`](https://huggingface.co/{base_model_id})" if base_model_id else f"`{base_model}` (a local model)"
    load_base = json.dumps(base_model_id) if base_model_id else f"{json.dumps(base_model)}  # the local folder of the base model"
    prompt = prompts[0] if prompts else ""
    rows = "\n".join(f"| `{k}` | `{json.dumps(config.get(k), default=str)}` |" for k in key_fields if k in config)
    metric_text = "\n".join(f"- {k}: {v:.6g}" for k, v in sorted(metrics.items())) if metrics else "(no metrics logged)"
    trained_on = ", ".join(f"`{p}`" for p in prompts) if prompts else "(none recorded)"
    objective = objective or f"to maximise the reward `{reward}`"
    body = f"""
# {method} LoRA for {os.path.basename(base_model.rstrip("/")) or base_model}

A LoRA for {base_link} trained with **{method}** ({paper}) using trl-gfn {objective} while
staying close to the pretrained model.

## Use it

```python
from diffusers import {pipeline_class}

pipeline = {pipeline_class}.from_pretrained({load_base})
pipeline.load_lora_weights({json.dumps(repo_id)})
image = pipeline({json.dumps(prompt)}, num_inference_steps={config.get("sample_num_steps", 50)}, guidance_scale={config.get("sample_guidance_scale", 7.5)}).images[0]
```
{extra_usage}
Prompts seen in training (first ones): {trained_on}.

## Training

| setting | value |
|---|---|
{rows}

## Final metrics

{metric_text}

## Citation

```bibtex
{citation.strip()}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def upload_files(folder: str, files: list[str], repo_id: str, *, private: bool | None = None, token: str | None = None,
                 commit_message: str = "Upload trl-gfn LoRA") -> Any:
    """Create ``repo_id`` if needed and upload exactly ``files`` (paths relative to ``folder``) in one commit.

    An explicit list rather than the whole folder: whatever else lies there (a ``.env``, logs, a stray
    checkpoint) is never uploaded. Each file must be a regular file inside ``folder``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    root = os.path.realpath(folder)
    operations = []
    for rel in files:
        path = os.path.join(folder, rel)
        if os.path.islink(path) or not os.path.isfile(path) or not os.path.realpath(path).startswith(root + os.sep):
            raise FileNotFoundError(f"push_to_hub: {path} is not a regular file inside {folder}; nothing was uploaded")
        operations.append(CommitOperationAdd(path_in_repo=rel.replace(os.sep, "/"), path_or_fileobj=path))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
