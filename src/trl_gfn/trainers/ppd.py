"""PPD: personalised preference fine-tuning with user embeddings (Dang et al., CVPR 2025, arXiv:2501.06655).

Each preference pair belongs to a user u (dataset column ``user_id`` or ``annotator_id``; ids are global across the train and
eval datasets). A frozen provider (:mod:`trl_gfn.models.user_encoder`) turns the user's first ``ppd_context_pairs`` pairs into
an embedding e_u; added decoupled attention layers (:class:`~trl_gfn.models.user_attention.UserCrossAttention`, trained
with the LoRA) let the policy attend to e_u's user tokens next to the text: on the UNet's cross-attention layers (SD 1.x/2.x,
SDXL; tokens appended to the text), or on SD3's joint attention layers (tokens passed beside the prompt, image tokens only). The loss is Diffusion-DPO's (or another
``loss_type``) over the pairs of all users, with the **policy** conditioned on the pair's user and the reference the
pretrained model (adapter off, text tokens only: the added branch is skipped). At the start the added output projections are
zero, so the policy equals the reference and, with one user, PPD's first loss and LoRA gradient are Diffusion-DPO's (tested).

At inference, pass the user tokens of an embedding — a seen user's, a new user's from their pairs (:meth:`PPDTrainer.embed_user`),
or an interpolation (1 − α)·e_a + α·e_b — to :meth:`DiffusionPipelineForRL.sample` as ``extra_tokens`` (:meth:`PPDTrainer.user_tokens`).
The final folder holds the LoRA, ``user_attention/`` (the added layers), ``user_embedding_provider/`` and ``user_embeddings.safetensors``
(e_u of every user trained on).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..configs.ppd import PPDConfig
from ..data.preference import PairBatch, PreferencePairs
from ..models.user_attention import UserCrossAttention
from ..models.user_encoder import load_user_embedding_provider
from .diffusion_dpo import Denoised, DiffusionDPOTrainer, PairInputs

USER_EMBEDDINGS_FILE = "user_embeddings.safetensors"
PROVIDER_FOLDER = "user_embedding_provider"
_CITATION = """@inproceedings{dang2025personalized,
  title     = {Personalized Preference Fine-tuning of Diffusion Models},
  author    = {Meihua Dang and Anikait Singh and Linqi Zhou and Stefano Ermon and Jiaming Song},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2025},
  eprint    = {2501.06655}
}"""


@dataclass
class PersonalInputs(PairInputs):
    """:class:`PairInputs` with the embedding e_u (B, embed_dim) of each pair's user."""

    user_embeddings: torch.Tensor | None = None


class PPDTrainer(DiffusionDPOTrainer):
    """Personalised preference fine-tuning: Diffusion-DPO over many users' pairs, the policy conditioned on user embeddings.

    Usage::

        trainer = PPDTrainer(PPDConfig(ppd_context_pairs=4), pipeline, train_dataset, eval_dataset)   # datasets with user_id
        trainer.train()
        e = 0.5 * trainer.user_embedding(0) + 0.5 * trainer.user_embedding(1)      # interpolate two users
        images = pipeline.sample(prompts, schedule, guidance_scale=3.0, extra_tokens=trainer.user_tokens(e.expand(len(prompts), -1))).images

    Same data checks, losses, logging, checkpoints, resume and Hub upload as :class:`DiffusionDPOTrainer`; logged in addition:
    ``data/users`` (users trained on).
    """

    config_class = PPDConfig

    def __init__(self, config: PPDConfig, pipeline, train_dataset, eval_dataset=None) -> None:
        super().__init__(config, pipeline, train_dataset, eval_dataset)
        base = "" if config.loss_type == "sigmoid" else f" ({self.method_name} loss)"
        self.method_name, self.method_tag = f"PPD{base}", "ppd"
        self.paper = "Dang, Singh, Zhou, Ermon, Song, *Personalized Preference Fine-tuning of Diffusion Models*, CVPR 2025, arXiv:2501.06655"
        self.citation = _CITATION + "\n\n" + self.citation

    @property
    def card_fields(self) -> list[str]:  # type: ignore[override]
        return super().card_fields + ["ppd_context_pairs", "ppd_num_tokens", "ppd_embedding_provider"]

    # ------------------------------------------------------------------ set-up
    def setup_components(self) -> None:
        """The preference trainer's checks; the provider; every user's embedding (checked before training); the added layers (on
        the denoiser's cross-attention layers, or SD3's joint attention layers)."""
        super().setup_components()
        c = self.config
        self.provider = load_user_embedding_provider(c.provider_path).to(self.accelerator.device)
        self.user_table: dict[Any, torch.Tensor] = {}
        self.train_users = self.register_users(self.train_pairs)
        if self.eval_pairs is not None:
            self.register_users(self.eval_pairs)
        text_length = int(self.pipeline.tokenizer.model_max_length)
        self.user_layers = UserCrossAttention.for_denoiser(self.pipeline.denoiser, self.provider.embed_dim, c.ppd_num_tokens, text_length)
        self.user_layers.install(self.pipeline.denoiser)

    def build_modules(self) -> dict[str, torch.nn.Module]:
        return {"user_attention": self.user_layers}

    def param_groups(self) -> list[dict[str, Any]]:
        c = self.config
        return super().param_groups() + [{"params": list(self.user_layers.parameters()), "lr": c.ppd_learning_rate or c.train_learning_rate,
                                          "weight_decay": c.train_adam_weight_decay, "name": "user_attention"}]

    def step(self, epoch: int, global_step: int) -> int:
        """The preference trainer's epoch; the number of users trained on is logged with the data figures."""
        if not self._data_logged:
            self.log({"data/users": float(len(self.train_users))}, step=global_step)
        return super().step(epoch, global_step)

    # ------------------------------------------------------------------ users
    def register_users(self, pairs: PreferencePairs) -> list[Any]:
        """Compute e_u for every user of ``pairs`` not known yet, from their first ``ppd_context_pairs`` kept pairs; returns the
        users of ``pairs``. A user with fewer pairs raises ``ValueError`` naming ``ppd_context_pairs``, the dataset and the user."""
        k = self.config.ppd_context_pairs
        if pairs.annotator_column is None:
            raise ValueError(f"{pairs.name}: PPD needs a user column (user_id or annotator_id) saying whose preference each pair is")
        column = pairs.dataset[pairs.annotator_column]
        by_user: dict[Any, list[int]] = defaultdict(list)
        for position, row in enumerate(pairs.rows):
            by_user[column[row]].append(position)
        short = {u: len(p) for u, p in by_user.items() if len(p) < k}
        if short:
            u, n = next(iter(short.items()))
            raise ValueError(f"ppd_context_pairs: user {u!r} of {pairs.name} has only {n} usable pair(s) (after dropped ties and skipped "
                             f"rows) but each user needs ppd_context_pairs={k} to compute their embedding; {len(short)} user(s) are short: "
                             f"{sorted(short.items(), key=str)[:5]}")
        for u, positions in by_user.items():
            if u not in self.user_table:
                batch = pairs.load(positions[:k], flip=False)  # the user's K context pairs as stored
                self.user_table[u] = self.embed_user(batch.winners, batch.losers, batch.captions)
        return list(by_user)

    @torch.no_grad()
    def embed_user(self, winners: torch.Tensor, losers: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """e_u (embed_dim,) of one user from K pairs: ``winners`` / ``losers`` (K, 3, H, W) in [-1, 1] (as :class:`PairBatch` holds them)."""
        device = self.accelerator.device
        w, lo = ((x.to(device).float() + 1) / 2 for x in (winners, losers))
        return self.provider(w[None], lo[None], [list(captions)])[0].float()

    def user_embedding(self, user: Any) -> torch.Tensor:
        """e_u of a user trained or evaluated on (KeyError naming the known users otherwise)."""
        if user not in self.user_table:
            raise KeyError(f"unknown user {user!r}; known: {sorted(self.user_table, key=str)[:10]} (embed a new user with embed_user)")
        return self.user_table[user]

    def model_card_extra_usage(self, repo_id: str = "<repo_id>") -> str:
        """The plain LoRA above samples without personalisation: how to load the user layers and sample for a user."""
        denoiser = self.pipeline.family.denoiser_name
        prompt = (self.card_prompt_examples() or ["a photo"])[0]
        return f"""
The LoRA alone does not personalise. The user layers are in `user_attention/`, each trained user's embedding e_u in
`user_embeddings.safetensors` (keyed by `str(user_id)`), and the frozen provider that embeds a new user's pairs in
`user_embedding_provider/`. To sample for user 0:

```python
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from trl_gfn import DiffusionPipelineForRL
from trl_gfn.models import UserCrossAttention

folder = snapshot_download({json.dumps(repo_id)})
layers = UserCrossAttention.from_pretrained(f"{{folder}}/user_attention")
layers.install(pipeline.{denoiser})                      # the pipeline above, with the LoRA loaded
e_u = load_file(f"{{folder}}/user_embeddings.safetensors")["0"]
rl = DiffusionPipelineForRL(pipeline)
images = rl.sample([{json.dumps(prompt)}], rl.make_schedule("auto", 30),
                   guidance_scale=7.5, extra_tokens=layers(e_u[None])).images    # a new user: docs/ppd.md
```
"""

    def user_tokens(self, embeddings: torch.Tensor) -> torch.Tensor:
        """User tokens (B, ppd_num_tokens, D) of embeddings (B, embed_dim), for ``DiffusionPipelineForRL.sample(extra_tokens=...)``
        (D: the pipeline's ``extra_token_dim``)."""
        with torch.no_grad():
            return self.user_layers(embeddings.to(self.accelerator.device))

    # ------------------------------------------------------------------ inputs and errors
    def make_pair_inputs(self, batch: PairBatch, generators: Sequence[torch.Generator]) -> PersonalInputs:  # type: ignore[override]
        inputs = super().make_pair_inputs(batch, generators)
        e = torch.stack([self.user_embedding(u) for u in batch.user_ids])
        return PersonalInputs(**{f.name: getattr(inputs, f.name) for f in dataclasses.fields(PairInputs)}, user_embeddings=e)

    def _with_user(self, inputs: PersonalInputs, tokens: torch.Tensor) -> PersonalInputs:
        return dataclasses.replace(inputs, prompt_embeds=self.pipeline.append_extra_tokens(inputs.prompt_embeds, tokens))

    def policy_errors(self, inputs: PersonalInputs) -> Denoised:  # type: ignore[override]
        """The policy with the pair's user tokens (projection and denoiser through the prepared model, with gradient)."""
        tokens = self.wrapped("user_attention")(inputs.user_embeddings)
        return self.denoise(self.wrapped("unet"), self._with_user(inputs, tokens))

    @torch.no_grad()
    def denoise_without_grad(self, inputs: PersonalInputs) -> Denoised:  # type: ignore[override]
        return self.denoise(self.pipeline.denoiser, self._with_user(inputs, self.user_layers(inputs.user_embeddings)))

    # ------------------------------------------------------------------ what is saved
    def output_files(self) -> list[str]:
        return super().output_files() + [USER_EMBEDDINGS_FILE, f"{PROVIDER_FOLDER}/provider.json", f"{PROVIDER_FOLDER}/model.safetensors",
                                         f"{PROVIDER_FOLDER}/config.json"]

    def save_trained_weights(self, directory: str) -> list[str]:
        """The LoRA and ``user_attention/`` (base class), the provider and every known user's embedding (keys: ``str(user_id)``)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.provider.save_pretrained(os.path.join(directory, PROVIDER_FOLDER))
        save_file({str(u): e.detach().float().cpu().contiguous() for u, e in self.user_table.items()}, os.path.join(directory, USER_EMBEDDINGS_FILE))
        return super().save_trained_weights(directory)

    def card_objective(self) -> str:
        return (f"to follow the personal preferences of {len(self.train_users)} users ({len(self.train_pairs)} pairs), conditioned on "
                f"user embeddings from {self.config.ppd_context_pairs} pairs per user")


__all__ = ["PPDTrainer", "PersonalInputs"]
