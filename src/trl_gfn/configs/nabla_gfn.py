"""Config of the Nabla-GFlowNet trainer (residual ∇-DB, Liu et al., ICLR 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import DiffusionRLConfig, _check

REWARD_GRADIENT_SCALINGS = ("squared", "sqrt")
TRANSITION_LOSS_WEIGHTINGS = ("none", "variance")


@dataclass
class NablaGFlowNetConfig(DiffusionRLConfig):
    """Configuration of :class:`~trl_gfn.NablaGFlowNetTrainer`.

    Defaults follow the paper's Stable Diffusion 1.5 setup (DESIGN.md §2): 50-step DDPM, CFG 5, LoRA
    rank 8, AdamW lr 1e-3 for LoRA and flow head, train on int(K·f) + 1 transitions with f = 0.1.
    Per-reward presets (β, λ) are in ``trl_gfn.rewards.presets``.
    """

    train_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the LoRA parameters."})
    train_timestep_fraction: float = field(default=0.1, metadata={"help": "f: train on int(K·f) + 1 transitions per trajectory (the last one always)."})

    reward_scale: float = field(default=1e3, metadata={"help": "β: the target density is p_ref(x_0)·exp(β·r(x_0)), r the log-reward."})
    unet_reg_scale: float = field(default=1e3, metadata={"help": "λ: weight of the output regulariser mean‖ε̂_θ(x_k) − ε̂_old(x_k)‖² (a trust region on the policy)."})
    reverse_loss_scale: float | None = field(default=None, metadata={"help": "Weight of the reverse ∇-DB term (trains the flow head only); default 1 with the flow head, 0 without."})
    pretrained_strength: float = field(default=1.0, metadata={"help": "s: multiplies the reference policy's score in the ∇-DB targets."})
    reward_gradient_scaling: Literal["squared", "sqrt"] = field(default="squared", metadata={"help": "γ_k in the flow-gradient guess β·γ_k·∇r(x̂_0): `squared` = ᾱ_k, `sqrt` = sqrt(ᾱ_k)."})
    transition_loss_weighting: Literal["none", "variance"] = field(default="none", metadata={"help": "`none`: squared score residuals as in the paper (they scale like 1/σ_k², so the nearly noise-free last steps dominate the update); `variance`: multiply the forward and reverse residuals by σ_k², which weighs every transition alike and keeps the same minimiser."})
    low_var_subsampling: bool = field(default=True, metadata={"help": "Draw the trained interior transitions one per equal chunk of the K steps (stratified) rather than uniformly."})
    jacobian_free_reward_gradient: bool = field(default=False, metadata={"help": "Approximation: take ε̂ at x_{k-1} from the sampling record as a constant, so the next-state reward gradient needs no UNet forward/backward (about a third less compute per interior step; see the benchmark for its effect)."})
    train_on_previous_samples: bool = field(default=False, metadata={"help": "Train each epoch on the previous epoch's trajectories (as one published implementation does) instead of the ones just sampled. Off by default: it trains on stale, off-policy samples."})

    use_flow_head: bool = field(default=True, metadata={"help": "Learn the residual flow-gradient correction g_φ; False = forward-only with the guessed gradient (less memory, less diversity)."})
    flow_block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 256], metadata={"help": "Widths of the flow head UNet's blocks (its depth is their number)."})
    flow_layers_per_block: int = field(default=1, metadata={"help": "ResNet layers per flow-head block."})
    flow_attention_head_dim: int = field(default=8, metadata={"help": "Attention head dim of the flow head's cross-attention."})
    flow_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the flow head."})
    flow_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay of the flow head."})
    flow_condition_on_prompt: bool = field(default=True, metadata={"help": "Feed the prompt embedding to the flow head; False feeds zeros (for prompt-free rewards such as aesthetics)."})

    field_ranges = {"reward_scale": ">= 0", "unet_reg_scale": ">= 0", "reverse_loss_scale": ">= 0", "pretrained_strength": ">= 0",
                    "flow_block_out_channels": ">= 1", "flow_layers_per_block": ">= 1", "flow_attention_head_dim": ">= 1",
                    "flow_learning_rate": "> 0", "flow_weight_decay": ">= 0"}

    def validate(self) -> None:
        super().validate()
        if self.reverse_loss_scale is None:
            self.reverse_loss_scale = 1.0 if self.use_flow_head else 0.0
        _check(self.reverse_loss_scale >= 0, "reverse_loss_scale", f"must be >= 0, got {self.reverse_loss_scale}")
        _check(self.use_flow_head or self.reverse_loss_scale == 0, "reverse_loss_scale",
               f"must be 0 when use_flow_head=False (the reverse term trains only the flow head), got {self.reverse_loss_scale}")
        _check(self.reward_scale >= 0, "reward_scale", f"must be >= 0, got {self.reward_scale}")
        _check(self.unet_reg_scale >= 0, "unet_reg_scale", f"must be >= 0, got {self.unet_reg_scale}")
        _check(self.pretrained_strength >= 0, "pretrained_strength", f"must be >= 0, got {self.pretrained_strength}")
        _check(self.reward_gradient_scaling in REWARD_GRADIENT_SCALINGS, "reward_gradient_scaling",
               f"must be one of {REWARD_GRADIENT_SCALINGS}, got {self.reward_gradient_scaling!r}")
        _check(self.transition_loss_weighting in TRANSITION_LOSS_WEIGHTINGS, "transition_loss_weighting",
               f"must be one of {TRANSITION_LOSS_WEIGHTINGS}, got {self.transition_loss_weighting!r}")
        _check(bool(self.flow_block_out_channels) and all(int(c) > 0 for c in self.flow_block_out_channels), "flow_block_out_channels",
               f"must be a non-empty list of positive widths, got {self.flow_block_out_channels}")
        _check(all(int(c) % self.flow_attention_head_dim == 0 for c in self.flow_block_out_channels), "flow_attention_head_dim",
               f"must divide every width in flow_block_out_channels {self.flow_block_out_channels}, got {self.flow_attention_head_dim}")
        _check(self.flow_layers_per_block >= 1, "flow_layers_per_block", f"must be >= 1, got {self.flow_layers_per_block}")
        _check(self.flow_learning_rate > 0, "flow_learning_rate", f"must be > 0, got {self.flow_learning_rate}")
        _check(self.flow_weight_decay >= 0, "flow_weight_decay", f"must be >= 0, got {self.flow_weight_decay}")

    @property
    def num_train_timesteps(self) -> int:
        """int(K·f) + 1 transitions per trajectory, capped at K: the last transition is always trained."""
        return min(self.sample_num_steps, int(self.sample_num_steps * self.train_timestep_fraction) + 1)
