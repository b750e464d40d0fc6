"""Saving, loading and publishing reward models, with strict checks.

Reward models are plain ``nn.Module`` s with :class:`huggingface_hub.PyTorchModelHubMixin`, so that a
converted reward is published once (``push_to_hub``) and loaded by id (``from_pretrained``). The mixin's
stock loader is permissive: it loads weights with ``strict=False`` and, when ``config.json`` is absent,
builds the model from default arguments. For a reward that would mean training against a partly random
network without noticing, so :class:`PretrainedRewardMixin` replaces the loader: the config and the
weights file must exist, every parameter must be present in the file and no extra key may be left over,
and the tokenizer (saved in a ``tokenizer/`` sub-folder) must have the vocabulary the text encoder
expects (``transformers`` can return an *empty* tokenizer without raising when files are missing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

from .base import RewardModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_SUBFOLDER = "tokenizer"


def _short_list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, assign: bool = False) -> None:
    """Load ``state_dict`` into ``module``; raise a ``ValueError`` naming missing/unexpected keys or bad shapes.

    ``source`` names the file or checkpoint in the error message.
    """
    own = module.state_dict()
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_short_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_short_list(unexpected)}")
    if shape_errors:
        problems.append(f"{len(shape_errors)} shape mismatch(es): {_short_list(shape_errors, 6)}")
    if problems:
        raise ValueError(
            f"cannot load {type(module).__name__} from {source}: " + "; ".join(problems)
            + ". The weights do not match the configured architecture; refusing to leave parameters at random values."
        )
    module.load_state_dict(dict(state_dict), strict=True, assign=assign)


def check_tokenizer(tokenizer: Any, vocab_size: int, *, eos_token_id: int | None = None, where: str = "tokenizer") -> None:
    """Raise a ``ValueError`` unless ``tokenizer`` has exactly ``vocab_size`` tokens (and the expected EOS id).

    ``transformers`` may build an (almost) empty tokenizer without an exception when its files are not
    found, e.g. ``CLIPTokenizer(vocab_file=...)`` or an offline ``from_pretrained``; scoring prompts with
    it would silently produce garbage rewards.
    """
    if tokenizer is None:
        raise ValueError(f"{where} is None; this reward scores prompts and needs the tokenizer it was trained with")
    if not callable(tokenizer):
        raise TypeError(f"{where} must be a transformers tokenizer, got {type(tokenizer).__name__}")
    size = len(tokenizer)
    if size != vocab_size:
        raise ValueError(
            f"{where} has {size} tokens but the text encoder expects {vocab_size}: the tokenizer files are missing "
            "or belong to another model (transformers returns a near-empty tokenizer without raising when its "
            "vocabulary files are not found, e.g. offline or with CLIPTokenizer(vocab_file=...))"
        )
    if eos_token_id is not None and getattr(tokenizer, "eos_token_id", None) != eos_token_id:
        raise ValueError(
            f"{where} has eos_token_id={getattr(tokenizer, 'eos_token_id', None)} but the text encoder pools at "
            f"eos_token_id={eos_token_id}"
        )


def config_to_dict(config: Any) -> dict:
    """Accept a ``PretrainedConfig`` or a dict; return a JSON-able dict."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"expected a config dict or a transformers config, got {type(config).__name__}")


class PretrainedRewardMixin(PyTorchModelHubMixin):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for reward modules, strict.

    Layout of a saved reward: ``config.json`` (the constructor arguments), ``model.safetensors``,
    ``tokenizer/`` (if the reward reads prompts) and a model card ``README.md``. Subclasses set
    ``tokenizer_required`` and implement ``_tokenizer_spec()`` -> ``(vocab_size, eos_token_id or None)``.
    """

    tokenizer_required: ClassVar[bool] = False
    #: checkpoint keys that are legitimately not parameters of the module (none by default)
    _ignored_load_keys: ClassVar[tuple[str, ...]] = ()

    # ---- tokenizer --------------------------------------------------------------------------------
    def _tokenizer_spec(self) -> tuple[int, int | None]:
        raise NotImplementedError

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Attach ``tokenizer`` after checking its vocabulary against the text encoder."""
        vocab_size, eos = self._tokenizer_spec()
        check_tokenizer(tokenizer, vocab_size, eos_token_id=eos, where=f"{type(self).__name__} tokenizer")
        self.tokenizer = tokenizer

    def _require_tokenizer(self) -> Any:
        tok = getattr(self, "tokenizer", None)
        if tok is None:
            raise ValueError(
                f"{type(self).__name__} has no tokenizer: load it with {type(self).__name__}.from_pretrained(...) "
                "or attach one with .set_tokenizer(tokenizer)"
            )
        return tok

    # ---- saving -----------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        if self.tokenizer_required:
            tok = self._require_tokenizer()
            tok.save_pretrained(str(Path(save_directory) / TOKENIZER_SUBFOLDER))
        super()._save_pretrained(save_directory)

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any):
        """Load a converted reward from a local directory or a Hub id; raise if anything is missing.

        Keyword arguments: those of :meth:`huggingface_hub.ModelHubMixin.from_pretrained` (``revision``,
        ``cache_dir``, ``force_download``, ``local_files_only``, ``token``), ``map_location`` (default
        ``"cpu"``), and ``tokenizer`` to override the saved tokenizer (it is checked all the same).
        """
        path = os.fspath(pretrained_model_name_or_path)
        looks_local = path.startswith((".", "~", os.sep)) or path.count("/") > 1 or os.path.exists(path)
        if looks_local and not os.path.isdir(path):
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained({path!r}): no such directory (and not a Hub id of the form 'owner/name')"
            )
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def _resolve_file(cls, model_id: str, filename: str, *, hub_kwargs: dict) -> str:
        if os.path.isdir(model_id):
            path = os.path.join(model_id, filename)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{cls.__name__}.from_pretrained({model_id!r}): no {filename} in that directory. A saved reward "
                    f"holds {CONFIG_NAME}, {WEIGHTS_NAME} and (for prompt-conditioned rewards) {TOKENIZER_SUBFOLDER}/; "
                    "make one from the official checkpoint with `trl-gfn-convert-reward`."
                )
            return path
        try:
            return hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs)
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained({model_id!r}): could not get {filename} ({type(err).__name__}: {err}). "
                "Pass a local directory made by `trl-gfn-convert-reward`, or a Hub id of a converted reward."
            ) from err

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        tokenizer: Any = None,
        **model_kwargs,
    ):
        if not strict:
            raise ValueError(f"{cls.__name__}.from_pretrained: strict=False is not supported; a reward must load completely")
        hub_kwargs = dict(revision=revision, cache_dir=cache_dir, force_download=force_download, token=token, local_files_only=local_files_only)
        # the stock mixin only logs when config.json is absent and then builds default (random) models
        cls._resolve_file(model_id, CONFIG_NAME, hub_kwargs=hub_kwargs)
        weights = cls._resolve_file(model_id, WEIGHTS_NAME, hub_kwargs=hub_kwargs)

        from accelerate import init_empty_weights

        from ..weights_io import read_safetensors

        with init_empty_weights(include_buffers=False):  # parameters on `meta`: no wasted random init
            model = cls(**model_kwargs)
        # a truncated or corrupt file is an error naming it, and so are NaN / inf weights (a reward that scores NaN)
        state_dict = read_safetensors(weights, what=f"{cls.__name__} weights")
        for key in cls._ignored_load_keys:
            state_dict.pop(key, None)
        load_state_dict_strict(model, state_dict, source=weights, assign=True)
        model.to(map_location)

        if cls.tokenizer_required:
            if tokenizer is None:
                tokenizer = cls._load_tokenizer(model_id, hub_kwargs)
            model.set_tokenizer(tokenizer)
        return model.freeze()

    @classmethod
    def _load_tokenizer(cls, model_id: str, hub_kwargs: dict) -> Any:
        from transformers import AutoTokenizer

        if os.path.isdir(model_id):
            folder = os.path.join(model_id, TOKENIZER_SUBFOLDER)
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"{cls.__name__}.from_pretrained({model_id!r}): no {TOKENIZER_SUBFOLDER}/ folder; this reward reads "
                    "prompts and is saved with its tokenizer (pass tokenizer=... to override)"
                )
            return AutoTokenizer.from_pretrained(folder)
        kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
        try:
            return AutoTokenizer.from_pretrained(model_id, subfolder=TOKENIZER_SUBFOLDER, **kwargs)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained({model_id!r}): could not load the tokenizer from its "
                f"{TOKENIZER_SUBFOLDER}/ sub-folder: {err}"
            ) from err


class PretrainedRewardModel(RewardModel, PretrainedRewardMixin, library_name="trl-gfn", tags=["reward-model", "trl-gfn"]):
    """Base class of the Hub-loadable reward models (a :class:`RewardModel` with strict Hub I/O).

    Parameters must be float32 when scoring: rewards and their gradients are computed in float32 even
    when the diffusion model runs in bf16 (bf16 reward gradients are too coarse to train on).
    """

    def _check_float32(self) -> None:
        for name, p in self.named_parameters():
            if p.dtype != torch.float32:
                raise ValueError(
                    f"{type(self).__name__} parameter {name} is {p.dtype}; reward models score in float32 "
                    "(keep the reward module in float32: call .float(), do not pass it to accelerator.prepare with "
                    "mixed precision)"
                )

    def _set_config(self, **config: Any) -> None:
        """Record the resolved constructor arguments written to ``config.json`` by ``save_pretrained``."""
        self._hub_mixin_config = config
