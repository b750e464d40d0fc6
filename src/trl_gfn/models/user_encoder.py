"""User-embedding providers for personalised preference fine-tuning (PPD): a few preference pairs of a user in, e_u out.

The contract (:class:`UserEmbeddingProvider`): ``provider(winners, losers, captions) -> (U, embed_dim)``, for U users given K
pairs each (``winners``/``losers``: float images in [0, 1], shape (U, K, 3, H, W); ``captions``: U lists of K strings).
Providers are frozen while the diffusion model trains; they are ``nn.Module`` + ``PyTorchModelHubMixin`` (``save_pretrained``,
``from_pretrained``, ``push_to_hub``), and :func:`load_user_embedding_provider` loads any registered class from its folder or
Hub repo by the class name stored in its config.

The paper's provider is a VLM (LLaVA-OneVision) prompted with the user's pairs and asked to describe the user's taste; its
hidden states are the embedding. :class:`DigitsUserEncoder` is the small one shipped here for the bundled digits model: a
network over the bundled classifier's class probabilities of the pairs, trained (:func:`train_digits_user_encoder`) to predict
held-out choices of simulated users. docs/ppd.md shows how a VLM provider plugs in.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

#: provider classes by name, for :func:`load_user_embedding_provider`
PROVIDERS: dict[str, type] = {}


def register_provider(cls: type) -> type:
    """Class decorator: make a :class:`UserEmbeddingProvider` subclass loadable by :func:`load_user_embedding_provider`."""
    PROVIDERS[cls.__name__] = cls
    return cls


class UserEmbeddingProvider(nn.Module):
    """Base class of user-embedding providers (see the module docstring). Subclasses set :attr:`embed_dim` and implement
    :meth:`forward`; they also subclass ``PyTorchModelHubMixin`` and are decorated with :func:`register_provider`."""

    embed_dim: int

    def forward(self, winners: torch.Tensor, losers: torch.Tensor, captions: Sequence[Sequence[str]]) -> torch.Tensor:
        raise NotImplementedError

    def _save_pretrained(self, save_directory) -> None:  # PyTorchModelHubMixin hook: weights + the class name for the loader
        super()._save_pretrained(save_directory)  # type: ignore[misc]
        with open(os.path.join(save_directory, "provider.json"), "w", encoding="utf-8") as f:
            json.dump({"provider_class": type(self).__name__}, f)


@register_provider
class DigitsUserEncoder(UserEmbeddingProvider, PyTorchModelHubMixin, library_name="trl-gfn", tags=["trl-gfn", "digits", "ppd"]):
    """e_u = MLP(mean_k [p(y | w_k) − p(y | l_k)]) over the bundled digit classifier's class probabilities of the user's K pairs.

    ``score_head`` maps an image's class probabilities to the embedding space, so that ⟨score_head(p(y|x)), e_u⟩ is the user's
    utility of x: the objective :func:`train_digits_user_encoder` fits on simulated users (and a check that e_u carries the
    user's taste). The classifier (200 kB) is part of the module, so the provider loads on its own.
    """

    def __init__(self, embed_dim: int = 16, hidden: int = 64, classifier_width: int = 16, classifier_feature_dim: int = 64,
                 classifier_input_size: int = 16) -> None:
        super().__init__()
        from ..rewards.digits import DigitClassifier

        self.embed_dim = int(embed_dim)
        self.classifier = DigitClassifier(width=classifier_width, feature_dim=classifier_feature_dim, input_size=classifier_input_size)
        self.classifier.requires_grad_(False)
        n = self.classifier.num_classes
        self.encoder = nn.Sequential(nn.Linear(n, hidden), nn.SiLU(), nn.Linear(hidden, embed_dim))
        self.score_head = nn.Linear(n, embed_dim, bias=False)

    def class_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """p(y | x) of images (..., 3, H, W) in [0, 1] -> (..., 10), with the classifier in eval mode."""
        self.classifier.eval()
        flat = images.reshape(-1, *images.shape[-3:])
        return F.softmax(self.classifier(flat).float(), dim=-1).reshape(*images.shape[:-3], -1)

    def forward(self, winners: torch.Tensor, losers: torch.Tensor, captions: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
        if winners.ndim != 5 or winners.shape != losers.shape:
            raise ValueError(f"DigitsUserEncoder expects winners and losers of shape (users, pairs, 3, H, W), got {tuple(winners.shape)} "
                             f"and {tuple(losers.shape)}")
        diff = (self.class_probabilities(winners) - self.class_probabilities(losers)).mean(dim=1)
        return self.encoder(diff)

    def utility(self, images: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """⟨score_head(p(y|x)), e_u⟩ for images (B, 3, H, W) and embeddings (B, embed_dim)."""
        return (self.score_head(self.class_probabilities(images)) * embeddings).sum(-1)


def load_user_embedding_provider(name_or_path: str | os.PathLike, **kwargs) -> UserEmbeddingProvider:
    """Load a provider saved with ``save_pretrained`` (a folder or a Hub repo): the class named in its ``provider.json``.

    A folder without weights raises ``FileNotFoundError`` (never a randomly initialised provider); an unknown class name raises
    ``ValueError`` listing the registered ones (:func:`register_provider`).
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        meta = os.path.join(path, "provider.json")
        if not os.path.isfile(os.path.join(path, "model.safetensors")) or not os.path.isfile(meta):
            raise FileNotFoundError(f"ppd_embedding_provider: {path} holds no provider (model.safetensors and provider.json, written by "
                                    "save_pretrained); refusing to build a randomly initialised one")
    else:
        from huggingface_hub import hf_hub_download

        from ..configs.base import HUB_REPO_ID

        repo, _, at_revision = path.partition("@")
        if path.startswith((".", "/", "~", "\\")) or os.path.exists(path) or repo.count("/") != 1 or not HUB_REPO_ID.match(repo):
            raise FileNotFoundError(f"ppd_embedding_provider: {path!r} is neither an existing folder nor a Hub repo id such as "
                                    "'me/my-provider' (a folder written by save_pretrained, holding model.safetensors and provider.json)")
        revision = kwargs.pop("revision", None) or at_revision or None
        try:
            meta = hf_hub_download(repo, "provider.json", revision=revision)
        except Exception as err:  # offline and not cached, unknown repo, no provider.json: name the field and the repo
            raise FileNotFoundError(f"ppd_embedding_provider: could not get provider.json of the Hub repo {path!r} "
                                    f"({type(err).__name__}: {err})") from err
        path = repo
        if revision is not None:
            kwargs["revision"] = revision
    with open(meta, encoding="utf-8") as f:
        name = json.load(f).get("provider_class")
    if name not in PROVIDERS:
        raise ValueError(f"ppd_embedding_provider: {path} holds a {name!r}, not a registered provider class {sorted(PROVIDERS)}")
    model = PROVIDERS[name].from_pretrained(path, strict=True, **kwargs)
    model.eval().requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------------ training the digits encoder
def train_digits_user_encoder(images: torch.Tensor, digits: torch.Tensor, classifier_dir: str, steps: int = 600, users_per_step: int = 64,
                              context_pairs: int = 4, query_pairs: int = 8, seed: int = 0, lr: float = 3e-3,
                              log=print) -> DigitsUserEncoder:
    """Fit a :class:`DigitsUserEncoder` on simulated users: each step draws random users (a random set S of 2-6 preferred
    digits each), K context pairs and Q query pairs per user from ``images`` (N, 3, H, W) in [0, 1] with classifier digits
    ``digits`` (N,), pairs with exactly one image in S, preferred = that one; loss −log σ(utility(w) − utility(l)) on the
    queries with e_u from the context. The classifier comes from ``classifier_dir`` (frozen)."""
    from ..rewards.digits import DigitClassifier

    g = torch.Generator().manual_seed(seed)
    cls = DigitClassifier.from_pretrained(classifier_dir)
    model = DigitsUserEncoder(classifier_width=cls.conv[0].out_channels, classifier_feature_dim=cls.feature_dim,
                              classifier_input_size=cls.input_size)
    model.classifier.load_state_dict(cls.state_dict())
    with torch.no_grad():
        probs = model.class_probabilities(images)
    params = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    opt = torch.optim.Adam(params, lr=lr)
    n = len(digits)
    for step in range(steps):
        ctx_w, ctx_l, q_w, q_l = [], [], [], []
        for _ in range(users_per_step):
            size = int(torch.randint(2, 7, (1,), generator=g))
            members = torch.zeros(10, dtype=torch.bool)
            members[torch.randperm(10, generator=g)[:size]] = True
            inside = torch.nonzero(members[digits]).flatten()
            outside = torch.nonzero(~members[digits]).flatten()
            k = context_pairs + query_pairs
            w = inside[torch.randint(len(inside), (k,), generator=g)]
            lo = outside[torch.randint(len(outside), (k,), generator=g)]
            ctx_w.append(w[:context_pairs]), ctx_l.append(lo[:context_pairs]), q_w.append(w[context_pairs:]), q_l.append(lo[context_pairs:])
        cw, cl, qw, ql = (torch.stack(x) for x in (ctx_w, ctx_l, q_w, q_l))
        e = model.encoder((probs[cw] - probs[cl]).mean(dim=1))  # (U, D)
        margin = ((model.score_head(probs[qw]) - model.score_head(probs[ql])) * e[:, None]).sum(-1)
        loss = F.softplus(-margin).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"step {step}: loss {loss.item():.4f}, query accuracy {(margin > 0).float().mean().item():.3f} (n={n})")
    model.eval().requires_grad_(False)
    return model


__all__ = ["DigitsUserEncoder", "PROVIDERS", "UserEmbeddingProvider", "load_user_embedding_provider", "register_provider",
           "train_digits_user_encoder"]
