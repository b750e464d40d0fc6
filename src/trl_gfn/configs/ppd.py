"""Config of PPD: personalised preference fine-tuning with user embeddings (Dang et al., CVPR 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import _check
from .dpo import DiffusionDPOConfig


#: the value of ``ppd_embedding_provider`` that names the bundled provider
BUNDLED_PROVIDER = "bundled"


@dataclass
class PPDConfig(DiffusionDPOConfig):
    """Configuration of :class:`~trl_gfn.PPDTrainer`: the Diffusion-DPO losses over the pairs of many users, with policy conditioned
    on each pair's user embedding e_u.

    Every :class:`DiffusionDPOConfig` field keeps its meaning. The dataset needs a ``user_id`` (or ``annotator_id``) column;
    each user's embedding comes from their first ``ppd_context_pairs`` kept pairs through the frozen provider
    ``ppd_embedding_provider``, and reaches the UNet through added decoupled cross-attention layers with ``ppd_num_tokens``
    user tokens, trained with the LoRA.
    """

    ppd_context_pairs: int = field(default=4, metadata={"help": "Preference pairs of a user that the embedding provider sees to compute e_u (the first ones of that user in the dataset; they are also trained on). A user with fewer kept pairs is an error."})
    ppd_embedding_provider: str = field(default=BUNDLED_PROVIDER, metadata={"help": "Folder or Hub repo of the frozen user-embedding provider (trl_gfn.models.user_encoder: save_pretrained output with provider.json); `bundled`: the shipped DigitsUserEncoder for the bundled digits model (trl_gfn.assets.BUNDLED_USER_ENCODER)."})
    ppd_num_tokens: int = field(default=4, metadata={"help": "User tokens the embedding is projected to; the added cross-attention layers attend to them next to the text tokens."})
    ppd_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the added layers (user-token projection and decoupled cross-attention); None: train_learning_rate."})

    field_ranges = {**DiffusionDPOConfig.field_ranges, "ppd_context_pairs": ">= 1", "ppd_num_tokens": ">= 1", "ppd_learning_rate": "> 0"}

    def validate(self) -> None:
        super().validate()
        _check(bool(self.ppd_embedding_provider), "ppd_embedding_provider", "must name a provider folder or Hub repo")
        _check(self.loss_type != "adaptive", "loss_type",
               "'adaptive' is not supported with PPD: its EMA copies cover the LoRA only, not the added user layers")


    @property
    def provider_path(self) -> str:
        """``ppd_embedding_provider`` with ``bundled`` resolved to the shipped provider's folder."""
        if self.ppd_embedding_provider == BUNDLED_PROVIDER:
            from ..assets import BUNDLED_USER_ENCODER

            return BUNDLED_USER_ENCODER
        return self.ppd_embedding_provider


__all__ = ["BUNDLED_PROVIDER", "PPDConfig"]
