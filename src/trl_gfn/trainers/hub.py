"""Model cards and Hub upload of a trained run (LoRA in diffusers format, optional extra models)."""

from __future__ import annotations

import json
import os
from typing import Any

CARD_TEMPLATE = """---
library_name: diffusers
{base_model_line}tags:
{tags}
---

# {title}

A LoRA for [`{base_model}`]({base_url}) trained with **{method}** ({paper}) using
[trl-gfn](https://github.com/trl-gfn/trl-gfn) to maximise the reward `{reward}` while staying close to
the pretrained model.

## Use it

```python
from diffusers import StableDiffusionPipeline

pipeline = StableDiffusionPipeline.from_pretrained("{base_model}")
pipeline.load_lora_weights("{repo_id}")
image = pipeline("a photo of a cat", num_inference_steps={steps}, guidance_scale={guidance}).images[0]
```
{extra_usage}
## Training

| setting | value |
|---|---|
{config_rows}

## Final metrics

{metrics}

## Citation

```bibtex
{citation}
```
"""


def render_model_card(
    *,
    repo_id: str,
    base_model: str,
    method: str,
    paper: str,
    citation: str,
    reward: str,
    config: dict[str, Any],
    key_fields: list[str],
    metrics: dict[str, float],
    extra_usage: str = "",
    tags: list[str] | None = None,
) -> str:
    """The README.md of a trained LoRA: method, base model, reward, key config, final metrics, loading code."""
    base_model = base_model or "<base model>"
    base_url = _model_url(base_model)
    rows = "\n".join(f"| `{k}` | `{json.dumps(config.get(k), default=str)}` |" for k in key_fields if k in config)
    metric_text = "\n".join(f"- {k}: {v:.6g}" for k, v in sorted(metrics.items())) if metrics else "(no metrics logged)"
    all_tags = ["trl-gfn", "diffusers", "lora", "text-to-image", *(tags or [])]
    return CARD_TEMPLATE.format(
        title=f"{method} LoRA for {os.path.basename(base_model.rstrip('/')) or base_model}",
        base_model=base_model,
        base_model_line=f"base_model: {base_model}\n" if base_url.startswith("https://huggingface.co/") else "",
        base_url=base_url,
        tags="\n".join(f"- {t}" for t in all_tags),
        method=method,
        paper=paper,
        reward=reward,
        repo_id=repo_id,
        steps=config.get("sample_num_steps", 50),
        guidance=config.get("sample_guidance_scale", 7.5),
        extra_usage=extra_usage,
        config_rows=rows,
        metrics=metric_text,
        citation=citation.strip(),
    )


def _model_url(base_model: str) -> str:
    """Hub URL of a model id; a local directory (or unknown model) links to nothing."""
    if base_model.startswith("http"):
        return base_model
    if base_model.startswith(("/", ".", "~", "<")) or base_model.count("/") != 1:
        return "#"
    return f"https://huggingface.co/{base_model}"


def public_model_name(name_or_path: str) -> str:
    """How a model card names the base model: a Hub id as is, a local directory by its last component only."""
    from ..configs.public import is_local_path

    if not name_or_path:
        return ""
    if is_local_path(name_or_path) or os.path.exists(name_or_path):
        return os.path.basename(os.path.normpath(name_or_path)) or "<local model>"
    return name_or_path


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
