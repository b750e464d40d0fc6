"""Config of SPIN-Diffusion: self-play fine-tuning from the preferred images only (Yuan et al., NeurIPS 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import _check, resolve_sampler
from .dpo import DiffusionDPOConfig


@dataclass
class SPINDiffusionConfig(DiffusionDPOConfig):
    """Configuration of :class:`~trl_gfn.SPINDiffusionTrainer`: self-play on the preferred image of each pair.

    Every :class:`DiffusionDPOConfig` field keeps its meaning, with "winner" = the real (preferred) image and "loser" = a sample
    of the previous iterate for the same caption; the reference is the previous iterate. Training runs
    ``spin_num_iterations`` iterations of ``spin_epochs_per_iteration`` epochs each, so ``num_epochs`` must equal their
    product. At the start of each iteration the reference moves forward to the current LoRA and the fakes are resampled
    with it (``spin_samples_per_prompt`` per real image; sampler fields ``sample_*``).
    """

    num_epochs: int = field(default=2, metadata={"help": "Passes over the (real, fake) pairs in all: must equal spin_num_iterations x spin_epochs_per_iteration."})
    spin_num_iterations: int = field(default=2, metadata={"help": "Self-play iterations k = 0, 1, ...: iteration k trains against the LoRA of the end of iteration k - 1 (the base model's, or init_from's, for k = 0) as reference and fake-sample generator."})
    spin_epochs_per_iteration: int = field(default=1, metadata={"help": "Epochs over the (real, fake) pairs per iteration before the reference moves forward and the fakes are resampled."})
    spin_samples_per_prompt: int = field(default=1, metadata={"help": "Fake images sampled per real image (same caption) at each iteration; each gives one (real, fake) pair, so an epoch has this many times more pairs than there are real images."})
    sample_num_steps: int = field(default=20, metadata={"help": "Sampler steps of the fake images (DDIM with sample_eta; the bundled model's default 20; SD 1.5 typically 50)."})
    sample_eta: float = field(default=1.0, metadata={"help": "DDIM eta of the fake-image sampler on the UNet families (1: DDPM; must be > 0); must stay 1.0 on SD3."})
    sample_noise_level: float = field(default=0.7, metadata={"help": "Noise level a of the flow SDE sampler of the fake images on a flow-matching model (SD3; 0: the deterministic Euler ODE; Flow-GRPO's 0.7); must stay 0.7 on the UNet families. The sampler is the model family's (DDIM with sample_eta, or the flow SDE)."})
    sample_guidance_scale: float = field(default=3.0, metadata={"help": "Classifier-free guidance of the fake-image sampler (the bundled model's default 3; SD 1.5 typically 7.5)."})
    sample_batch_size: int = field(default=64, metadata={"help": "Fake images sampled per batch (per process) when the fakes are regenerated."})

    field_ranges = {**DiffusionDPOConfig.field_ranges, "spin_num_iterations": ">= 1", "spin_epochs_per_iteration": ">= 1",
                    "spin_samples_per_prompt": ">= 1", "sample_num_steps": ">= 1", "sample_eta": "(0, 1]", "sample_noise_level": ">= 0", "sample_guidance_scale": ">= 0",
                    "sample_batch_size": ">= 1"}

    def resolve_sampler(self, family_sampler: str) -> str:
        """The fake-image sampler for a model family whose stochastic sampler is ``family_sampler`` (see
        :func:`~trl_gfn.configs.base.resolve_sampler`)."""
        return resolve_sampler(self, family_sampler)

    def validate(self) -> None:
        super().validate()
        total = self.spin_num_iterations * self.spin_epochs_per_iteration
        _check(self.num_epochs == total, "num_epochs",
               f"SPIN-Diffusion trains spin_num_iterations x spin_epochs_per_iteration = {self.spin_num_iterations} x "
               f"{self.spin_epochs_per_iteration} = {total} epochs; got num_epochs={self.num_epochs} (set it to {total})")
        _check(self.loss_type not in ("sft", "adaptive"), "loss_type",
               f"{self.loss_type!r} is not a self-play loss (sft has no fake; adaptive's EMA copies and minority metric assume human labels); "
               "use sigmoid (SPIN's logistic loss), hinge, ipo, dmpo or see")
        _check(self.tie_handling == "drop", "tie_handling",
               f"must be 'drop' for SPIN-Diffusion: the real image of a pair is its preferred one, which a tie does not have; got {self.tie_handling!r}")


__all__ = ["SPINDiffusionConfig"]
