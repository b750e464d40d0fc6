"""What of a config may leave the machine: the copy that is uploaded with a model, logged to trackers and
written into checkpoints has credentials redacted and no local absolute paths.

A tracker API key given in ``tracker_kwargs`` (``{"wandb": {"api_key": ...}}``) or a token in
``accelerator_kwargs`` must not end up in ``training_config.json`` on the Hub or in TensorBoard's hparams;
a path such as ``/home/me/runs`` says nothing useful to a reader of the model card and tells them about
the machine it was trained on.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"
#: substrings of dict keys whose values are treated as credentials
SECRET_KEY_PARTS = ("key", "token", "secret", "passw", "credential", "auth", "cookie", "private", "session")
#: values that are credentials whatever their key (Hugging Face, OpenAI-style, wandb-style 40-hex keys)
SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|[0-9a-f]{40})$")


def is_secret_key(key: Any) -> bool:
    k = str(key).lower()
    return any(part in k for part in SECRET_KEY_PARTS)


def redact(value: Any) -> Any:
    """A copy of ``value`` with every credential-like dict entry (by key, at any depth) or token-like string replaced."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str) and SECRET_VALUE.match(value):
        return REDACTED
    return value


def is_local_path(value: Any) -> bool:
    """An absolute or home-relative path (``/...``, ``C:\\...``, ``~...``)."""
    return isinstance(value, str) and bool(value) and (os.path.isabs(value) or value.startswith("~") or bool(re.match(r"^[A-Za-z]:[\\/]", value)))


def strip_local_path(value: Any) -> Any:
    """``<local>/<last component>`` for a local absolute path; other values unchanged (lists and dicts recursively)."""
    if isinstance(value, dict):
        return {k: strip_local_path(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strip_local_path(v) for v in value]
    if is_local_path(value):
        last = os.path.basename(os.path.normpath(value.replace("\\", "/"))) if value.strip("/\\~") else ""
        return f"<local>/{last}" if last else "<local>"
    return value


__all__ = ["REDACTED", "is_local_path", "is_secret_key", "redact", "strip_local_path"]
