"""Configs of the reward-backpropagation trainers DRaFT / DRaFT-K / DRaFT-LV (Clark et al., ICLR 2024) and AlignProp
(Prabhudesai et al., 2023), the latter with the field names of TRL's former ``AlignPropConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import DiffusionRLConfig, _check, warn_ignored
from .validation import check_fields


@dataclass
class DRaFTConfig(DiffusionRLConfig):
    """Configuration of :class:`~trl_gfn.DRaFTTrainer`.

    Each epoch draws ``sample_batch_size * sample_num_batches_per_epoch`` samples per process *with*
    gradient, in micro-batches of ``train_batch_size``, and maximises the mean reward of the final images
    by back-propagating through the last ``draft_k`` sampling steps (earlier steps run without gradient).

    - DRaFT-K: ``draft_k = K`` (default 1); ``draft_k = 0`` back-propagates through all steps (full DRaFT).
    - DRaFT-LV: ``draft_lv_copies = n >= 1`` (requires ``draft_k = 1``): the final sample x_0 is re-noised
      n times to the level of x_1 and the last step is differentiated on each copy.
    - AlignProp's randomised truncation: ``truncated_backprop_rand=True`` draws, per micro-batch, the first
      differentiated step t uniformly from ``truncated_rand_backprop_minmax`` (steps t..K-1 get gradient).

    On a flow-matching model (SD3) the sampler is the flow SDE at ``sample_noise_level`` (reparameterised: the noise is
    held fixed, the path differentiated); ``sample_noise_level=0`` differentiates through the deterministic Euler ODE,
    as DRaFT and AlignProp are usually run on flow models. Both are accepted: the method needs no transition density.
    """

    train_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the LoRA parameters."})
    vae_gradient_checkpointing: bool = field(default=True, metadata={"help": "Checkpoint the VAE decoder block by block when the reward is differentiated through it: same gradients, one more decoder forward per reward gradient. On by default here: the decoder's activations are the largest graph of a transition (docs/memory.md)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute UNet activations in the backward pass, so that memory grows slowly with the number of differentiated steps."})
    draft_k: int = field(default=1, metadata={"help": "K: back-propagate the reward through the last K sampling steps (DRaFT-K); 0 means all sample_num_steps steps (full DRaFT)."})
    draft_lv_copies: int = field(default=0, metadata={"help": "n >= 1 turns on DRaFT-LV (needs draft_k=1): n re-noised copies of x_1 = q(x_1 | x_0) are denoised with gradient and their rewards averaged; 0 disables."})
    truncated_backprop_rand: bool = field(default=False, metadata={"help": "AlignProp: randomise the truncation point per micro-batch (overrides draft_k)."})
    truncated_rand_backprop_minmax: list[int] | None = field(default=None, metadata={"help": "AlignProp: inclusive range [lo, hi] of the first differentiated step index t (sampling order, 0 = noisiest), drawn once per micro-batch; steps t..K-1 get gradient, t = K (allowed, as TRL's default (0, 50) for 50 steps) none. Default [0, sample_num_steps - 1]."})

    field_ranges = {"draft_k": ">= 0", "draft_lv_copies": ">= 0", "truncated_rand_backprop_minmax": ">= 0"}
    requires_transition_density = False  # gradient through the sampler: the deterministic flow ODE is allowed

    def validate(self) -> None:
        super().validate()
        K = self.sample_num_steps
        _check(self.draft_k <= K, "draft_k", f"must be an integer in [0, sample_num_steps={K}] (0 = all steps), got {self.draft_k!r}")
        if self.draft_lv_copies:
            _check(self.num_backprop_steps == 1, "draft_k", f"DRaFT-LV (draft_lv_copies={self.draft_lv_copies}) differentiates only the last step: draft_k must be 1, got {self.draft_k}")
            _check(not self.truncated_backprop_rand, "truncated_backprop_rand", "cannot be combined with DRaFT-LV (draft_lv_copies > 0)")
        if self.truncated_rand_backprop_minmax is not None:
            mm = self.truncated_rand_backprop_minmax
            _check(len(mm) == 2 and all(isinstance(v, int) for v in mm) and 0 <= mm[0] <= mm[1] <= K, "truncated_rand_backprop_minmax",
                   f"must be two integers 0 <= lo <= hi <= sample_num_steps = {K} (a step index t; steps t..K-1 get gradient, "
                   f"t = K none), got {mm!r}")
            self.truncated_rand_backprop_minmax = [int(mm[0]), int(mm[1])]
            if not self.truncated_backprop_rand:
                warn_ignored("truncated_rand_backprop_minmax", "truncated_backprop_rand=False (draft_k sets the truncation)")
        if self.truncated_backprop_rand and self.draft_k != 1 and type(self) is DRaFTConfig:
            warn_ignored("draft_k", "truncated_backprop_rand=True draws the truncation from truncated_rand_backprop_minmax")

    @property
    def num_backprop_steps(self) -> int:
        """Number of (last) sampling steps differentiated when the truncation is not randomised."""
        return self.sample_num_steps if self.draft_k == 0 else self.draft_k

    @property
    def rand_backprop_minmax(self) -> tuple[int, int]:
        """The inclusive range of the first differentiated step index for randomised truncation."""
        mm = self.truncated_rand_backprop_minmax
        return (0, self.sample_num_steps - 1) if mm is None else (mm[0], mm[1])


@dataclass
class AlignPropConfig(DRaFTConfig):
    """Configuration of AlignProp (:class:`~trl_gfn.AlignPropTrainer`), with TRL's former ``AlignPropConfig`` names and meanings.

    AlignProp is DRaFT with randomised truncation: ``truncated_backprop_rand=True`` (default) draws the first
    differentiated step from ``truncated_rand_backprop_minmax``; with ``truncated_backprop_rand=False``
    gradients reach steps ``truncated_backprop_timestep .. K-1`` (TRL's default 49 with K = 50: the last step).

    As in TRL, an epoch is one optimizer step over ``train_gradient_accumulation_steps`` micro-batches of
    ``train_batch_size`` samples drawn with gradient: ``sample_batch_size`` and ``sample_num_batches_per_epoch``
    default to those two (set them to draw more micro-batches per epoch). Differences from TRL:
    ``truncated_rand_backprop_minmax`` defaults to ``[0, K - 1]`` (TRL's ``(0, 50)`` is accepted; its t = 50 gives a
    micro-batch without gradient) and t is drawn once per micro-batch, not anew at every step.
    """

    sample_batch_size: int | None = field(default=None, metadata={"help": "Samples per sampling batch; default (None) train_batch_size, as TRL's AlignProp drew train_batch_size samples per micro-batch."})
    sample_num_batches_per_epoch: int | None = field(default=None, metadata={"help": "Sampling batches per epoch; default (None) train_gradient_accumulation_steps, i.e. one optimizer step per epoch as in TRL's AlignProp."})
    truncated_backprop_rand: bool = field(default=True, metadata={"help": "Randomise the truncation point per micro-batch (AlignProp's randomised truncated backpropagation)."})
    truncated_backprop_timestep: int | None = field(default=None, metadata={"help": "With truncated_backprop_rand=False: the first step index (sampling order) that gets gradient; steps before it are detached. Default sample_num_steps - 1 (TRL's 49 for 50 steps): the last step only. Sets draft_k = sample_num_steps - truncated_backprop_timestep."})

    field_ranges = {"truncated_backprop_timestep": ">= 0"}

    def __post_init__(self) -> None:
        #: fields left at None and filled from train_batch_size / train_gradient_accumulation_steps (refilled on every validate)
        self._derived = {name for name in ("sample_batch_size", "sample_num_batches_per_epoch") if getattr(self, name) is None}
        super().__post_init__()

    def validate(self) -> None:
        derived = getattr(self, "_derived", set())
        for name, source in (("sample_batch_size", "train_batch_size"), ("sample_num_batches_per_epoch", "train_gradient_accumulation_steps")):
            value = getattr(self, source)
            if name in derived or getattr(self, name) is None:
                derived.add(name)  # a bad source value is reported under its own name by check_fields below
                setattr(self, name, value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None)
        self._derived = derived
        check_fields(self)  # before the timestep is turned into draft_k
        K = self.sample_num_steps
        if self.truncated_backprop_timestep is not None:
            t = self.truncated_backprop_timestep
            _check(isinstance(t, int) and 0 <= t <= K - 1, "truncated_backprop_timestep",
                   f"must be an integer in [0, sample_num_steps - 1 = {K - 1}], got {t!r}")
            if self.draft_k not in (1, K - t):
                raise ValueError(f"draft_k: conflicts with truncated_backprop_timestep={t} (which means draft_k={K - t}); set only one of them")
            self.draft_k = K - t
        super().validate()
