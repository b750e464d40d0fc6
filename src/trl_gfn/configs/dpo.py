"""Config of the preference trainer (Diffusion-DPO and its successors DMPO, SEE-DPO, Adaptive-DPO, IPO, hinge)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

from .base import BaseDiffusionConfig, _check, warn_ignored

#: default β per loss type (measured on the bundled digits model, docs/preference.md; the papers' SD 1.5 values are in the docs)
DEFAULT_BETA = {"sigmoid": 500.0, "hinge": 500.0, "ipo": 500.0, "dmpo": 500.0, "see": 500.0, "adaptive": 500.0, "sft": 500.0}
#: loss types that do not read beta (their logged logits still use it)
BETA_FREE_LOSSES = ("sft",)
#: fields that only one loss type reads
LOSS_FIELDS = {"dmpo": ("dmpo_alpha",), "see": ("see_gamma",),
               "adaptive": ("adaptive_rho", "adaptive_temperature", "adaptive_intercept", "adaptive_margin", "adaptive_ema_decays")}
#: loss types the winner-preserving rescale of Diffusion-SDPO applies to
WINNER_PRESERVING_LOSSES = ("sigmoid", "dmpo")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class DiffusionDPOConfig(BaseDiffusionConfig):
    """Configuration of :class:`~trl_gfn.DiffusionDPOTrainer`: offline training of the LoRA on preference pairs.

    Shares the base config's names (``num_epochs``, ``train_batch_size``, ``train_learning_rate``,
    ``train_gradient_accumulation_steps``, ``seed``, ``logdir``, ``save_freq``, ``mixed_precision``, ...); an epoch is
    one pass over the pairs and ``train_batch_size`` counts pairs. ``loss_type`` picks the method and ``beta`` its KL
    weight (default per loss type, :data:`DEFAULT_BETA`); the ``dmpo_*``, ``see_*`` and ``adaptive_*`` fields belong to
    one loss each (setting one for another loss warns). The defaults train the bundled digits model on its bundled
    preference data; docs/preference.md lists the papers' Stable Diffusion settings.
    """

    num_epochs: int = field(default=4, metadata={"help": "Passes over the preference pairs."})
    train_batch_size: int = field(default=16, metadata={"help": "Preference pairs per training micro-batch (per process); each pair is two images through the UNet, with and without the adapter."})
    train_learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of the LoRA parameters (see lr_scheduler)."})

    loss_type: Literal["sigmoid", "hinge", "ipo", "dmpo", "see", "adaptive", "sft"] = field(default="sigmoid", metadata={"help": "`sigmoid`: Diffusion-DPO (Wallace et al. 2023); `hinge`: max(0, 1 - u); `ipo`: IPO's squared loss (u - 1/2)^2; `dmpo`: DMPO's reverse KL to Bernoulli(1 - dmpo_alpha) (Li et al. 2025); `see`: SEE-DPO's self-entropy regularisation (Shekhar et al. 2024); `adaptive`: Adaptive-DPO's minority-aware weight and margin (Zhang et al. 2025); `sft`: the baseline of supervised fine-tuning on the preferred images only, loss err_policy,w (no reference, loser or beta in the loss; the logged logits still use them). u = -(beta/2)[(err_policy,w - err_ref,w) - (err_policy,l - err_ref,l)]."})
    beta: float | None = field(default=None, metadata={"help": "KL weight beta of the implicit reward beta*log(pi/pi_ref) (err is a per-pixel mean: beta absorbs the pixel count and ELBO weights). None: the loss type's default, chosen on the bundled model (" + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_BETA.items()) + "); Diffusion-DPO used 2000-5000 on SD 1.5."})
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = field(default="constant_with_warmup", metadata={"help": "Learning-rate schedule over the run's optimizer steps: constant, linear warm-up then constant, or warm-up then linear / cosine decay to 0."})
    lr_warmup_steps: int = field(default=10, metadata={"help": "Optimizer steps of linear warm-up from 0 (not used by `constant`)."})

    resolution: int | None = field(default=None, metadata={"help": "Side of the square training images: images are resized (shorter side) and center-cropped to it. None: the model's resolution (UNet sample size x VAE scale)."})
    random_flip: bool = field(default=False, metadata={"help": "Flip each training image horizontally with probability 1/2 (diffusers' Diffusion-DPO example does for photographs; off by default because digits are not mirror-symmetric)."})
    tie_handling: Literal["drop", "soft"] = field(default="drop", metadata={"help": "Pairs with 0 < label_0 < 1 (ties): `drop` them (Diffusion-DPO's practice on Pick-a-Pic, counted in the logs), or `soft`: train on p*L(u) + (1-p)*L(-u) with p the probability that the preferred image wins (0.5 for a tie pushes u to the reference's). Not with `adaptive`."})
    invalid_rows: Literal["error", "skip"] = field(default="error", metadata={"help": "A row with a missing or empty caption, a label outside [0, 1] or an undecodable image: `error` stops before training with its row and column named; `skip` leaves it out and warns with the count."})
    verify_images: bool = field(default=True, metadata={"help": "Decode every image before training, so that a bad one is found (and skipped or reported) before any work; False decodes them only when their batch loads (a bad image then stops training with its row named)."})
    save_steps: int = field(default=0, metadata={"help": "Also write a checkpoint after every this many optimizer updates (when the global step is a multiple of it), inside an epoch too, like diffusers' --checkpointing_steps and TRL's save_steps: on a large dataset a crash then loses at most this many updates instead of an epoch. A checkpoint inside epoch E is <run>/checkpoints/checkpoint_E_step_<global step>; one that falls on an epoch's last update is that epoch's checkpoint_<E+1>. resume_from continues inside the epoch exactly where it stopped (the same pairs, noises and updates as an uninterrupted run), with the same number of processes, train_batch_size and train_gradient_accumulation_steps. num_checkpoint_limit counts both kinds. 0 (default): checkpoints every save_freq epochs only."})
    eval_freq: int = field(default=1, metadata={"help": "Evaluate loss and implicit accuracy on eval_dataset every this many epochs (fixed noise per pair; 0 disables; used when an eval_dataset is given)."})

    dmpo_alpha: float = field(default=0.01, metadata={"help": "DMPO: the target preference probability is 1 - dmpo_alpha; the loss is the reverse KL(Bernoulli(sigmoid(u)) || Bernoulli(1 - alpha)), minimised at u = log((1 - alpha)/alpha)."})
    see_gamma: float = field(default=500.0, metadata={"help": "SEE-DPO: weight gamma of the policy's self-entropy in the objective (same units as beta); the loss is -log sigmoid(u - (gamma/2)(err_policy,w - err_policy,l)); 0 gives Diffusion-DPO exactly."})
    adaptive_rho: float = field(default=15.0, metadata={"help": "Adaptive-DPO: scale rho of the logits in the minority metric m = (1 - mean_k sigmoid(rho u_k)) * min(std_k(rho u_k), 1) over the current model and its EMA copies."})
    adaptive_temperature: float = field(default=10.0, metadata={"help": "Adaptive-DPO: temperature T of the instance weight 1 / (T m + c)."})
    adaptive_intercept: float = field(default=1.0, metadata={"help": "Adaptive-DPO: intercept c of the instance weight 1 / (T m + c)."})
    adaptive_margin: Literal["linear", "quadratic"] = field(default="quadratic", metadata={"help": "Adaptive-DPO: the adaptive margin added to u for likely-minority pairs: m (`linear`) or m^2 (`quadratic`)."})
    adaptive_ema_decays: list[float] = field(default_factory=lambda: [0.9999, 0.5], metadata={"help": "Adaptive-DPO: decays of the EMA copies of the LoRA whose logits, with the current model's, give the minority metric (the paper's 0.9999 and 0.5)."})
    winner_preserving_mu: float | None = field(default=None, metadata={"help": "Diffusion-SDPO's winner-preserving rescale (sigmoid and dmpo losses): the loser error's gradient is scaled per pair so that, to first order, the winner's error does not increase, keeping a fraction mu of its descent (the paper uses 0.9). None: off."})

    field_ranges = {"beta": "> 0", "lr_warmup_steps": ">= 0", "resolution": ">= 8", "eval_freq": ">= 0", "save_steps": ">= 0", "dmpo_alpha": "(0, 0.5)", "see_gamma": ">= 0",
                    "adaptive_rho": "> 0", "adaptive_temperature": ">= 0", "adaptive_intercept": "> 0", "adaptive_ema_decays": "[0, 1)",
                    "winner_preserving_mu": "[0, 1]"}

    def validate(self) -> None:
        super().validate()
        if self.vae_gradient_checkpointing:
            warn_ignored("vae_gradient_checkpointing", "the preference trainers never differentiate through the VAE decoder")
        for loss, names in LOSS_FIELDS.items():
            for name in names:
                if loss != self.loss_type and getattr(self, name) != _default_value(type(self), name):
                    warn_ignored(name, f"it belongs to loss_type={loss!r}, not {self.loss_type!r}")
        if self.loss_type == "adaptive":
            _check(len(self.adaptive_ema_decays) >= 1, "adaptive_ema_decays", f"needs at least one EMA decay, got {self.adaptive_ema_decays}")
            _check(self.tie_handling == "drop", "tie_handling",
                   "must be 'drop' with loss_type='adaptive': its minority metric compares each pair's label with the models' judgement, "
                   f"which a soft label does not have; got {self.tie_handling!r}")
        if self.winner_preserving_mu is not None:
            _check(self.loss_type in WINNER_PRESERVING_LOSSES, "winner_preserving_mu",
                   f"applies to loss_type in {list(WINNER_PRESERVING_LOSSES)} (a loss that lowers the winner's error and raises the "
                   f"loser's), not {self.loss_type!r}; got {self.winner_preserving_mu}")
        if self.loss_type in BETA_FREE_LOSSES and self.beta is not None:
            warn_ignored("beta", f"loss_type={self.loss_type!r} does not read it (only the logged logits do)")
        if self.loss_type == "sft":
            _check(self.tie_handling == "drop", "tie_handling", f"must be 'drop' with loss_type='sft' (a tie has no preferred image to fine-tune on); got {self.tie_handling!r}")
        if self.lr_scheduler == "constant" and self.lr_warmup_steps != _default_value(type(self), "lr_warmup_steps"):
            warn_ignored("lr_warmup_steps", "lr_scheduler='constant' has no warm-up")

    def to_public_dict(self) -> dict:
        """:meth:`BaseDiffusionConfig.to_public_dict` with ``beta`` resolved to the value trained with (saved configs, cards, trackers)."""
        out = super().to_public_dict()
        out["beta"] = self.effective_beta
        return out

    @property
    def effective_beta(self) -> float:
        """``beta``, or the loss type's default (:data:`DEFAULT_BETA`) when it is None."""
        return float(self.beta) if self.beta is not None else DEFAULT_BETA[self.loss_type]



def _default_value(cls: type, name: str):
    f = {f.name: f for f in fields(cls)}[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]


__all__ = ["BETA_FREE_LOSSES", "DEFAULT_BETA", "DiffusionDPOConfig", "LOSS_FIELDS", "LR_SCHEDULES", "WINNER_PRESERVING_LOSSES"]
