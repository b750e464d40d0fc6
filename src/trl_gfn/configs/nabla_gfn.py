"""Config of the Nabla-GFlowNet trainer (residual ∇-DB, Liu et al., ICLR 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import DiffusionRLConfig, _check, warn_ignored

REWARD_GRADIENT_SCALINGS = ("squared", "sqrt", "saturating")
TRANSITION_LOSS_WEIGHTINGS = ("none", "variance")
FLOW_GUESS_MODELS = ("reference", "policy")
REVERSE_LOSS_TYPES = ("pathwise", "score", "reference")
FLOW_HEAD_TRAJECTORIES = ("policy", "reference_resampled")
FLOW_ESTIMATORS = ("nabla_db", "monte_carlo")
VALUE_BASELINES = ("guess", "none")
IMPORTANCE_WEIGHTINGS = ("none", "linearised")

#: the loss exactly as the paper (and its released code) specifies it; :meth:`NablaGFlowNetConfig.paper` sets these
PAPER_LOSS = dict(transition_loss_weighting="none", flow_guess_model="policy", reverse_loss_type="score", train_flow_head_on_forward_loss=True)


@dataclass
class NablaGFlowNetConfig(DiffusionRLConfig):
    """Configuration of :class:`~trl_gfn.NablaGFlowNetTrainer`.

    Sizes follow the paper's Stable Diffusion 1.5 setup (DESIGN.md §2): 50-step DDPM, CFG 5, LoRA rank 8,
    AdamW lr 1e-3, train on int(K·f) + 1 transitions with f = 0.1. Per-reward presets (β, λ) are in
    ``trl_gfn.rewards.presets``.

    The loss defaults are this library's, not the paper's: with the paper's loss the fine-tuned model does not
    reach the target p_ref·exp(βr) on our benchmark (docs/benchmark.md). Four fields differ:
    ``transition_loss_weighting="variance"``, ``flow_guess_model="reference"``, ``reverse_loss_type="pathwise"``
    and ``train_flow_head_on_forward_loss=False`` (docs/nabla_gfn.md explains each). :meth:`paper` builds a
    config with the paper's exact loss.
    """

    train_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the LoRA parameters."})
    vae_gradient_checkpointing: bool = field(default=True, metadata={"help": "Checkpoint the VAE decoder block by block when the reward is differentiated through it: same gradients, one more decoder forward per reward gradient. On by default here: the decoder's activations are the largest graph of a transition (docs/memory.md)."})
    save_freq: int = field(default=10, metadata={"help": "Save an accelerate checkpoint every this many epochs (0 disables). Default 10 (the other trainers: 1, as TRL's): a Nabla-GFlowNet checkpoint of SD1.5 (27 M trained parameters: LoRA r8 and flow head, with their two AdamW states) is about 320 MB."})
    log_image_freq: int = field(default=10, metadata={"help": "Log a grid of sampled images with prompts and rewards every this many epochs (0 disables). Default 10 (the other trainers: 1, as TRL's): the samples are decoded and scored only on these epochs, since the loss itself computes the logged rewards r(x_0)."})
    train_timestep_fraction: float = field(default=0.1, metadata={"help": "f: train on int(K·f) + 1 transitions per trajectory (the last one always)."})

    reward_scale: float = field(default=1e3, metadata={"help": "β: the target density is p_ref(x_0)·exp(β·r(x_0)), r the log-reward."})
    reward_scale_warmup_updates: int = field(default=0, metadata={"help": "β annealing: with N > 0 the loss uses β_u = β·min(1, (u + 1)/N) at optimizer update u (0-based) — in the flow-gradient guess, the exact β∇r(x_0), the posterior and rollout weights, the trajectory-balance correction and the regulariser's β² scaling — so the target tilts gradually from near p_ref to p_ref·exp(β r). Logged as `reward_scale_now`. Needs flow_estimator='nabla_db'. 0 (default): β from the first update."})
    unet_reg_scale: float = field(default=1e3, metadata={"help": "λ: weight of the output regulariser mean‖ε̂_θ(x_k) − ε̂_old(x_k)‖² (a trust region on the policy)."})
    unet_anchor_reg_scale: float = field(default=0.0, metadata={"help": "λ_ref: weight of a second output regulariser mean‖ε̂_θ(x_k) − ε̂_ref(x_k)‖², anchored to the reference (pretrained) model instead of the sampling policy. A constant pull towards the prior: it moves the fixed point from p_ref·exp(β r) towards p_ref (at interior steps the policy's residual shrinks by about λ_ref/(c_k²/σ_k² + λ_ref), c_k²/σ_k² ≈ 1–2 on SD-like schedules), in exchange for a restoring force against drift between modes. Scaled by (β/β_λ)² like unet_reg_scale when unet_reg_reference_reward_scale is set. Free: ε̂_ref is computed anyway. 0 (default): off."})
    unet_reg_reference_reward_scale: float | None = field(default=None, metadata={"help": "β_λ: the reward scale at which unet_reg_scale is given. When set, the regulariser's weight is λ·(β/β_λ)², so that changing reward_scale keeps the trust region's strength relative to the ∇-DB terms (their residuals grow like β, their squares like β²; the regulariser does not), i.e. one λ serves every β. With reward_gradient_scaling='saturating' the guess is not proportional to β at the noisy steps, and the factor follows its size per transition: (β·γ_k(β) / (β_λ·γ_k(β_λ)))², γ_k at the transition's next state ((β/β_λ)² at the last transition, about 1 at the noisiest ones). None (default): λ is used as given, at any β (the paper's convention)."})
    reverse_loss_scale: float | None = field(default=None, metadata={"help": "Weight of the reverse ∇-DB term (trains the flow head only); default 1 with the flow head, 0 without."})
    pretrained_strength: float = field(default=1.0, metadata={"help": "s: multiplies the reference policy's score in the ∇-DB targets."})
    reward_gradient_scaling: Literal["squared", "sqrt", "saturating"] = field(default="squared", metadata={"help": "γ_k in the flow-gradient guess β·γ_k·∇r(x̂_0): `squared` = ᾱ_k (the paper's), `sqrt` = sqrt(ᾱ_k), `saturating` = ᾱ_k / (ᾱ_k + (β/β_c)·(1 − ᾱ_k)) with β_c = reward_gradient_saturation_reward_scale: the factor by which smoothing β·r over the Gaussian posterior of x_0 shrinks its gradient when the log-reward's curvature is 1/β_c, so that at the noisy steps β·γ_k stops growing with β (the soft value log E[exp(β r(x_0)) | x_k] of a confident reward hardly depends on β there). Equal to `squared` at β = β_c; larger at smaller β, smaller at larger β. On flows ᾱ_k reads (1 − σ)² / ((1 − σ)² + σ²). docs/nabla_gfn.md, 'How large the guess is at each β'."})
    reward_gradient_saturation_reward_scale: float | None = field(default=None, metadata={"help": "β_c of reward_gradient_scaling='saturating' (required there, unused otherwise): the reward scale at which the guess equals the `squared` one, i.e. 1/β_c is the log-reward's assumed curvature. Give the β at which the `squared` guess is known to work for the reward, as unet_reg_reference_reward_scale gives the β of λ."})
    transition_loss_weighting: Literal["none", "variance"] = field(default="variance", metadata={"help": "`variance` (default): multiply each transition's forward and reverse squared residuals by σ_k², i.e. match mean shifts in units of the step's std, which weighs every transition alike and keeps the same minimiser; `none` (the paper's): plain squared score residuals, which scale like 1/σ_k², so the nearly noise-free last steps dominate the update."})
    flow_guess_model: Literal["reference", "policy"] = field(default="reference", metadata={"help": "Whose one-step prediction x̂_0 the flow-gradient guess β·γ_k·∇r(x̂_0(x)) uses: `reference` (default; the residual flow is a property of the reference sampler, so the flow head then learns a fixed target) or `policy` (the paper's: the fine-tuned model, a guess that moves with the policy and feeds back its bias)."})
    reverse_loss_type: Literal["pathwise", "score", "reference"] = field(default="pathwise", metadata={"help": "Target of the reverse term for ∇ log F̃ at x_k: `pathwise` (default) carries the flow gradient of the sampled next state back through the policy step (J_θᵀ·∇log F̃(x_{k-1}) plus the score terms), also on the last transition where β∇r(x_0) is exact, so information reaches the noisy steps in one hop per update; `score` (the paper's) uses ∇_{x_k} of the two log-densities only, on interior transitions, which holds only once the policy is already optimal; `reference` carries the flow gradient of the sampled next state back through the reference step only (J_refᵀ·∇log F̃(x_{k-1}), the soft-value recursion of the reference sampler linearised over one step), so the policy's own residual does not enter the flow head's target and one policy input-gradient per transition is saved; needs pretrained_strength = 1. All share the same fixed point (for `reference`, up to the one-step linearisation)."})
    train_flow_head_on_forward_loss: bool = field(default=False, metadata={"help": "Let the forward term also train the flow head (the paper's). Off by default: the flow head is then a critic trained only by the reverse and terminal terms, and the forward term no longer pulls it towards the current policy (at initialisation, towards cancelling the guess)."})
    low_var_subsampling: bool = field(default=True, metadata={"help": "Draw the trained interior transitions one per equal chunk of the K steps (stratified) rather than uniformly."})
    guess_posterior_samples: int = field(default=1, metadata={"help": "M: with M > 1 the guess at a noisy state averages ∇r over M samples x̂_0 + sqrt(1 − ᾱ_k)·ε of a Gaussian posterior around the one-step prediction, weighted by exp(β r) (self-normalised), i.e. the gradient of log mean exp(β r) instead of β r at the blurry x̂_0 (the Gaussian posterior approximation of ΠGDM, Song et al. 2023). M decodes and reward gradients per guess instead of 1; 1 (default): the paper's one-point guess."})
    jacobian_free_reward_gradient: bool = field(default=False, metadata={"help": "Approximation: hold the noise prediction at x_{k-1} constant in the guess, so no UNet backward is needed there (with flow_guess_model='policy' the ε̂ recorded while sampling is used and no UNet call at all; with 'reference' one reference forward without grad). About a third less compute per interior step; its effect is measured in docs/benchmark.md."})
    memory_efficient_order: bool = field(default=True, metadata={"help": "Order a transition's work so that no two large graphs are alive at once: the UNet calls that only carry ∇r back to a state (the guess at x_{k-1}, the reference side of the reverse term) are checkpointed, so their activations are recomputed in their VJP instead of sitting beside the VAE and reward graphs; with flow_guess_model='policy' ∇r at the policy's x̂_0(x_k) is taken before the policy graph is built; the flow head runs checkpointed before the policy, so its activations are recomputed after the policy's backward. Same gradients; one more UNet forward per such pass and one more flow-head forward (docs/memory.md)."})
    train_on_previous_samples: bool = field(default=False, metadata={"help": "Train each epoch on the previous epoch's trajectories (as one published implementation does) instead of the ones just sampled. Off by default: it trains on stale, off-policy samples."})

    guess_clip_quantile: float = field(default=1.0, metadata={"help": "q: with q < 1, the reward gradient ∇r(x̂_0) of the guess at interior states is clipped per sample to the norm at the q-quantile of the previous epoch's interior guesses (the quantile clipping of VGG-Flow, Liu et al. 2025: outlying reward gradients, e.g. of images near a class boundary, no longer dominate the flow gradient). The exact β∇r(x_0) of the last transition is never clipped, and nothing is clipped in the first epoch. The threshold is logged as `guess_clip_threshold` and kept in checkpoints. 1 (default): no clipping."})
    flow_target_rollouts: int = field(default=0, metadata={"help": "M: with M > 0 the forward target of every interior transition x_k → x_{k-1} is a Monte-Carlo estimate instead of the guess: M reference steps x'_j from x_k, each continued to x_0^j by the reference sampler, weighted w_j ∝ exp(β r(x_0^j)), give (μ* − μ_ref(x_k))/σ_k² = Σ_j w_j z_j/σ_k (z_j the first steps' noise), the mean shift of the ideal transition P*(x'|x_k) ∝ P_ref(x'|x_k)·F̃(x') (equal to E_P*[∇ log F̃(x')], the forward term's optimum). Unbiased up to self-normalisation, noisy, with no reward gradient and no learned critic. Needs use_flow_head=False. Cost per interior transition: M × (remaining steps) reference forwards without grad and M decodes and rewards. 0 (default): the guess. docs/nabla_gfn.md, 'Monte-Carlo forward target'."})
    trajectory_balance_scale: float = field(default=0.0, metadata={"help": "μ: weight of a trajectory-level correction whose only fixed point is also the target: the log-variance (relative trajectory balance) loss Var_τ[log P_θ(τ)/P_ref(τ) − β·r(x_0)] over the sampled batch, applied to the trained transitions as μ·A_τ·log P_θ(x_{k-1}|x_k) with A_τ the trajectory's deviation from the batch mean (held fixed). It vanishes exactly when every trajectory has the same log-ratio, i.e. at p_ref·exp(β r), and pushes mode weights directly, which the per-transition ∇-DB terms only see through the flow gradient. Costs one reference forward (no grad) per sampled step. 0 (default): off. docs/nabla_gfn.md, 'Trajectory-balance correction'."})

    importance_weighting: Literal["none", "linearised"] = field(default="none", metadata={"help": "Off-policy correction of the forward and reverse terms. Both regress onto the flow gradient at the sampled next state x_{k-1} ~ P_old(·|x_k), but their fixed-point identities hold in expectation over the ideal step P*(x'|x_k) ∝ P_ref(x'|x_k)·F̃(x'), so off the fixed point both average the flow over the policy's own continuations. `linearised`: weight each transition by w ∝ P*/P_old with log F̃ linearised over the step, log w = log P_ref(x'|x_k) − log P_old(x'|x_k) + f(x')·(x' − μ_old(x_k)), f the current flow-gradient estimate at x' (guess + flow head; β∇r(x_0) on the last step); centred, clipped at ±importance_log_weight_clip and normalised to mean 1 among the batch's transitions of the same step. w ≡ 1 when the sampling policy is the linearised ideal step. No extra model evaluations. Measured on the digits benchmark: not a fix (worse on S = {0, 8}). `none` (default): unweighted. docs/nabla_gfn.md, 'Importance-weighted transitions'."})
    importance_log_weight_clip: float = field(default=2.0, metadata={"help": "importance_weighting='linearised': the centred log-weights are clipped to ±this (weights within a factor e^{2c} of each other), which bounds the variance of one-sample weights at the price of some bias."})
    flow_head_trajectories: Literal["policy", "reference_resampled"] = field(default="policy", metadata={"help": "Whose trajectories the reverse and terminal terms train the flow head on. `policy` (default, the paper's): the policy's own sampled transitions. `reference_resampled`: each epoch, flow_reference_candidates reference-model (adapter off) trajectories are sampled per policy trajectory with its prompt, scored, and one is drawn per policy trajectory in proportion to exp(β·r(x_0)) among the candidates with the same prompt and metadata; the reverse term then carries the flow back through the reference step (J_refᵀ·∇log F̃(x_{k-1}), the pathwise form at θ = ref) on those transitions, and the terminal term applies at their x_0. Reference trajectories weighted by exp(β·r(x_0)) are distributed as the target's own path measure, for which the reverse identity ∇log F̃_k(x) = E[J_refᵀ∇log F̃_{k-1}(x')] holds exactly, so the flow head's target no longer depends on where the policy goes; the forward term still trains the policy on its own transitions. Needs the flow head with flow_estimator='nabla_db', flow_guess_model='reference', reverse_loss_type 'pathwise' or 'reference' (the same at θ = ref), importance_weighting='none' and train_flow_head_on_forward_loss=False. Cost per epoch: flow_reference_candidates × the policy's sampling (no grad) and its decode and reward; per trained transition a reference forward and backward more, no policy input-gradient. docs/nabla_gfn.md, 'Flow head on resampled reference trajectories'."})
    train_policy_on_reference_trajectories: bool = field(default=False, metadata={"help": "flow_head_trajectories='reference_resampled': also apply the forward term to the resampled reference transitions (the loss's forward term is then the mean over the policy's and the reference rows). At a state x_k of a trajectory drawn from the target's path measure the next state is a draw of the ideal step P*(·|x_k), so the forward regression's target is the ideal mean shift E_P*[∇log F̃(x')] rather than the average over the policy's own continuations. One more policy forward and backward per trained transition."})
    reference_forward_target: Literal["flow", "location"] = field(default="flow", metadata={"help": "train_policy_on_reference_trajectories: the forward term's target on the reference rows. `flow` (default): the flow-gradient estimate f(x_{k-1}) = guess + g_φ, as on the policy's rows. `location`: (x_{k-1} − μ_ref(x_k))/σ_k², the ideal step's draw itself, whose expectation over the ideal step is the same mean shift (μ* − μ_ref)/σ_k² (Stein's identity) without any flow estimate: unbiased where the flow estimate is not (a confident classifier's saturated reward), but carrying the step's noise (norm ≈ sqrt(D)/σ_k). With it the reference rows' forward term is the diffusion model's maximum-likelihood loss on the resampled reference transitions."})
    flow_reference_candidates: int = field(default=2, metadata={"help": "flow_head_trajectories='reference_resampled': reference trajectories sampled per policy trajectory each epoch; the one trained on is drawn from all candidates with the same prompt (and metadata) in proportion to exp(β·r(x_0)). More candidates: a drawn trajectory closer to the target's path measure (self-normalised importance resampling), at the price of more reference sampling. The weights' effective sample size per prompt group is logged as `flow_reference_ess`."})

    use_flow_head: bool = field(default=True, metadata={"help": "Learn the residual flow-gradient correction g_φ; False = forward-only with the guessed gradient (less memory, less diversity)."})
    flow_block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 256], metadata={"help": "Widths of the flow head UNet's blocks (its depth is their number)."})
    flow_layers_per_block: int = field(default=1, metadata={"help": "ResNet layers per flow-head block."})
    flow_attention_head_dim: int = field(default=8, metadata={"help": "Attention head dim of the flow head's cross-attention."})
    flow_learning_rate: float = field(default=1e-2, metadata={"help": "Learning rate of the flow head (the paper's 1e-3 equals the LoRA's; a faster critic than actor lets the flow head track the policy)."})
    flow_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay of the flow head."})
    flow_estimator: Literal["nabla_db", "monte_carlo"] = field(default="nabla_db", metadata={"help": "How the flow head learns the residual ∇ log F̃ of the forward target at interior states. `nabla_db` (the paper's structure): g_φ is a vector field trained by the reverse and terminal ∇-DB terms. `monte_carlo`: the flow head is a scalar log-flow critic u_ψ (spatial mean of its output); log F̃ = [guess baseline, value_baseline] + β·u_ψ is fitted to exp(β·r(x_0)) of reference-sampler rollouts from the trained states by a proper scoring loss (an unbiased, policy-independent target: F̃ belongs to the reference sampler), optionally warmed up on reference trajectories before training; the forward target is the guess + ∇_x β·u_ψ, with no reverse or terminal term. The last transition keeps the exact β∇r(x_0) in both. docs/nabla_gfn.md, 'Monte-Carlo flow critic'."})
    value_baseline: Literal["guess", "none"] = field(default="guess", metadata={"help": "flow_estimator='monte_carlo': `guess` (default) models log F̃(x) = β·γ_k·r(decode(x̂_0(x))) + β·u_ψ(x), the critic learning only the residual u_ψ on top of the guess (at initialisation the forward target is the guess, as with the flow head at zero); `none` models log F̃ = β·u_ψ alone."})
    value_rollouts: int = field(default=1, metadata={"help": "flow_estimator='monte_carlo': reference rollouts to x_0 from each trained next state x_{k-1}; every state a rollout passes through is a labelled example for the critic."})
    value_warmup_trajectories: int = field(default=0, metadata={"help": "flow_estimator='monte_carlo': before the first update, sample this many trajectories with the reference model (per process) and fit the critic on all their states (each labelled with its trajectory's r(x_0)): F̃ belongs to the reference sampler, so the critic can be trained before the policy moves. 0: no warm-up. Skipped on resume (the critic is in the checkpoint)."})
    value_warmup_steps: int = field(default=0, metadata={"help": "flow_estimator='monte_carlo': optimizer steps of the critic's warm-up (AdamW at flow_learning_rate, flow_weight_decay), each on value_warmup_batch_size states drawn from the warm-up trajectories."})
    value_warmup_batch_size: int = field(default=64, metadata={"help": "flow_estimator='monte_carlo': states per warm-up step of the critic."})
    flow_condition_on_prompt: bool = field(default=True, metadata={"help": "Feed the prompt embedding to the flow head; False feeds zeros (for prompt-free rewards such as aesthetics)."})

    field_ranges = {"reward_scale": ">= 0", "unet_reg_scale": ">= 0", "unet_reg_reference_reward_scale": "> 0", "unet_anchor_reg_scale": ">= 0", "reverse_loss_scale": ">= 0", "pretrained_strength": ">= 0",
                    "flow_block_out_channels": ">= 1", "flow_layers_per_block": ">= 1", "flow_attention_head_dim": ">= 1",
                    "flow_learning_rate": "> 0", "flow_weight_decay": ">= 0", "value_rollouts": ">= 1", "value_warmup_trajectories": ">= 0",
                    "value_warmup_steps": ">= 0", "value_warmup_batch_size": ">= 1",
                    "guess_posterior_samples": ">= 1", "trajectory_balance_scale": ">= 0",
                    "guess_clip_quantile": "(0, 1]", "flow_target_rollouts": ">= 0", "importance_log_weight_clip": "> 0", "reward_scale_warmup_updates": ">= 0", "flow_reference_candidates": ">= 1",
                    "reward_gradient_saturation_reward_scale": "> 0"}

    @classmethod
    def paper(cls, **overrides) -> NablaGFlowNetConfig:
        """A config with the paper's exact loss (Liu et al., ICLR 2025 and its released code): unweighted score
        residuals, the policy's x̂_0 in the guess, the score form of the reverse term on interior transitions, the
        flow head also trained by the forward term, and the flow head's learning rate equal to the LoRA's 1e-3.
        ``overrides`` set any other field (or override these)."""
        kwargs = dict(PAPER_LOSS, flow_learning_rate=1e-3)
        kwargs.update(overrides)
        return cls(**kwargs)

    def validate(self) -> None:
        super().validate()
        _check(self.flow_guess_model in FLOW_GUESS_MODELS, "flow_guess_model", f"must be one of {FLOW_GUESS_MODELS}, got {self.flow_guess_model!r}")
        _check(self.flow_estimator in FLOW_ESTIMATORS, "flow_estimator", f"must be one of {FLOW_ESTIMATORS}, got {self.flow_estimator!r}")
        _check(self.flow_estimator == "nabla_db" or self.use_flow_head, "flow_estimator",
               "'monte_carlo' needs use_flow_head=True (the flow head is then the log-flow critic)")
        _check(self.guess_posterior_samples >= 1, "guess_posterior_samples", f"must be >= 1, got {self.guess_posterior_samples}")
        _check(self.value_baseline in VALUE_BASELINES, "value_baseline", f"must be one of {VALUE_BASELINES}, got {self.value_baseline!r}")
        _check(self.value_rollouts >= 1, "value_rollouts", f"must be >= 1, got {self.value_rollouts}")
        _check(self.value_warmup_trajectories >= 0, "value_warmup_trajectories", f"must be >= 0, got {self.value_warmup_trajectories}")
        _check(self.value_warmup_steps >= 0, "value_warmup_steps", f"must be >= 0, got {self.value_warmup_steps}")
        _check(self.value_warmup_batch_size >= 1, "value_warmup_batch_size", f"must be >= 1, got {self.value_warmup_batch_size}")
        _check((self.value_warmup_trajectories > 0) == (self.value_warmup_steps > 0), "value_warmup_steps",
               f"the critic's warm-up needs both value_warmup_trajectories and value_warmup_steps > 0 (or both 0), got "
               f"{self.value_warmup_trajectories} and {self.value_warmup_steps}")
        _check(self.value_warmup_trajectories == 0 or self.flow_estimator == "monte_carlo", "value_warmup_trajectories",
               "the critic's warm-up needs flow_estimator='monte_carlo'")
        _check(self.reward_scale_warmup_updates == 0 or self.flow_estimator == "nabla_db", "reward_scale_warmup_updates",
               "β annealing is built for the ∇-DB loss; it cannot be combined with flow_estimator='monte_carlo'")
        _check(self.importance_weighting in IMPORTANCE_WEIGHTINGS, "importance_weighting",
               f"must be one of {IMPORTANCE_WEIGHTINGS}, got {self.importance_weighting!r}")
        _check(self.importance_weighting == "none" or self.flow_estimator == "nabla_db", "importance_weighting",
               "'linearised' weights the ∇-DB forward and reverse terms; it cannot be combined with flow_estimator='monte_carlo'")
        _check(self.reverse_loss_type in REVERSE_LOSS_TYPES, "reverse_loss_type", f"must be one of {REVERSE_LOSS_TYPES}, got {self.reverse_loss_type!r}")
        _check(self.reverse_loss_type != "reference" or self.pretrained_strength == 1.0, "reverse_loss_type",
               f"'reference' carries the flow back through the reference step itself and needs pretrained_strength = 1, got {self.pretrained_strength}")
        _check(self.flow_head_trajectories in FLOW_HEAD_TRAJECTORIES, "flow_head_trajectories",
               f"must be one of {FLOW_HEAD_TRAJECTORIES}, got {self.flow_head_trajectories!r}")
        _check(self.flow_reference_candidates >= 1, "flow_reference_candidates", f"must be >= 1, got {self.flow_reference_candidates}")
        if self.flow_head_trajectories == "reference_resampled":
            for name, ok, need in (("use_flow_head", self.use_flow_head, "True (the reverse term trains the flow head)"),
                                   ("flow_estimator", self.flow_estimator == "nabla_db", "'nabla_db'"),
                                   ("flow_guess_model", self.flow_guess_model == "reference", "'reference' (the reference trajectories' guess)"),
                                   ("reverse_loss_type", self.reverse_loss_type != "score", "'pathwise' or 'reference' (the score form vanishes at θ = ref)"),
                                   ("importance_weighting", self.importance_weighting == "none", "'none' (the resampling is the importance correction)"),
                                   ("train_flow_head_on_forward_loss", not self.train_flow_head_on_forward_loss, "False (the flow head learns from the reference trajectories only)"),
                                   ("pretrained_strength", self.pretrained_strength == 1.0, "1 (the reference step is carried back as it is)")):
                _check(ok, name, f"flow_head_trajectories='reference_resampled' needs {name} = {need}, got {getattr(self, name)!r}")
        _check(not self.train_policy_on_reference_trajectories or self.flow_head_trajectories == "reference_resampled",
               "train_policy_on_reference_trajectories", "needs flow_head_trajectories='reference_resampled' (the trajectories it trains on)")
        _check(self.reference_forward_target in ("flow", "location"), "reference_forward_target",
               f"must be 'flow' or 'location', got {self.reference_forward_target!r}")
        if not self.train_policy_on_reference_trajectories and self.reference_forward_target != "flow":
            warn_ignored("reference_forward_target", "only used with train_policy_on_reference_trajectories=True")
        if self.flow_head_trajectories != "reference_resampled" and self.flow_reference_candidates != 2:
            warn_ignored("flow_reference_candidates", "only used with flow_head_trajectories='reference_resampled'")
        if self.reverse_loss_scale is None:
            self.reverse_loss_scale = 1.0 if self.use_flow_head and self.flow_estimator == "nabla_db" else 0.0
        _check(self.flow_estimator == "nabla_db" or self.reverse_loss_scale == 0, "reverse_loss_scale",
               f"must be 0 with flow_estimator='monte_carlo' (the critic is fitted to rollouts, not by the reverse term), got {self.reverse_loss_scale}")
        _check(self.reverse_loss_scale >= 0, "reverse_loss_scale", f"must be >= 0, got {self.reverse_loss_scale}")
        _check(self.use_flow_head or self.reverse_loss_scale == 0, "reverse_loss_scale",
               f"must be 0 when use_flow_head=False (the reverse term trains only the flow head), got {self.reverse_loss_scale}")
        _check(self.reward_scale >= 0, "reward_scale", f"must be >= 0, got {self.reward_scale}")
        _check(self.unet_reg_scale >= 0, "unet_reg_scale", f"must be >= 0, got {self.unet_reg_scale}")
        _check(self.flow_target_rollouts >= 0, "flow_target_rollouts", f"must be >= 0, got {self.flow_target_rollouts}")
        _check(self.flow_target_rollouts == 0 or not self.use_flow_head, "flow_target_rollouts",
               "the Monte-Carlo forward target replaces the flow gradient at interior states; set use_flow_head=False")
        _check(self.flow_target_rollouts == 0 or self.flow_estimator == "nabla_db", "flow_target_rollouts",
               "cannot be combined with flow_estimator='monte_carlo'")
        _check(0 < self.guess_clip_quantile <= 1, "guess_clip_quantile", f"must be in (0, 1] (1: no clipping), got {self.guess_clip_quantile}")
        _check(self.trajectory_balance_scale >= 0, "trajectory_balance_scale", f"must be >= 0, got {self.trajectory_balance_scale}")
        _check(self.trajectory_balance_scale == 0 or self.reward_scale > 0, "trajectory_balance_scale",
               "needs reward_scale > 0 (with β = 0 the target is the reference itself)")
        _check(self.pretrained_strength >= 0, "pretrained_strength", f"must be >= 0, got {self.pretrained_strength}")
        _check(self.reward_gradient_scaling in REWARD_GRADIENT_SCALINGS, "reward_gradient_scaling",
               f"must be one of {REWARD_GRADIENT_SCALINGS}, got {self.reward_gradient_scaling!r}")
        if self.reward_gradient_scaling == "saturating":
            _check(self.reward_gradient_saturation_reward_scale is not None, "reward_gradient_saturation_reward_scale",
                   "is required with reward_gradient_scaling='saturating' (the β at which the guess equals the 'squared' one)")
        elif self.reward_gradient_saturation_reward_scale is not None:
            warn_ignored("reward_gradient_saturation_reward_scale", "only used with reward_gradient_scaling='saturating'")
        _check(self.transition_loss_weighting in TRANSITION_LOSS_WEIGHTINGS, "transition_loss_weighting",
               f"must be one of {TRANSITION_LOSS_WEIGHTINGS}, got {self.transition_loss_weighting!r}")
        _check(bool(self.flow_block_out_channels) and all(int(c) > 0 for c in self.flow_block_out_channels), "flow_block_out_channels",
               f"must be a non-empty list of positive widths, got {self.flow_block_out_channels}")
        _check(all(int(c) % self.flow_attention_head_dim == 0 for c in self.flow_block_out_channels), "flow_attention_head_dim",
               f"must divide every width in flow_block_out_channels {self.flow_block_out_channels}, got {self.flow_attention_head_dim}")
        _check(self.flow_layers_per_block >= 1, "flow_layers_per_block", f"must be >= 1, got {self.flow_layers_per_block}")
        _check(self.flow_learning_rate > 0, "flow_learning_rate", f"must be > 0, got {self.flow_learning_rate}")
        _check(self.flow_weight_decay >= 0, "flow_weight_decay", f"must be >= 0, got {self.flow_weight_decay}")
        if self.use_flow_head and self.num_train_timesteps == 1:
            warn_ignored("use_flow_head", f"with sample_num_steps={self.sample_num_steps} and train_timestep_fraction="
                         f"{self.train_timestep_fraction}, int(K·f) + 1 = 1: only the last transition is trained, whose forward target "
                         f"has no flow-head term, so the flow head never shapes the policy. Set train_timestep_fraction >= "
                         f"{1 / self.sample_num_steps:.3g} (one interior transition per trajectory) or use_flow_head=False.")

    def regulariser_scaling(self, reward_scale: float | None = None) -> float:
        """(β/β_λ)² with ``unet_reg_reference_reward_scale`` (β = ``reward_scale``, default the config's), else 1. With
        ``reward_gradient_scaling="saturating"`` the trainer's factor also depends on the step
        (:meth:`NablaGFlowNetTrainer.regulariser_scaling`); this is its value at the last transition."""
        if self.unet_reg_reference_reward_scale is None:
            return 1.0
        beta = self.reward_scale if reward_scale is None else reward_scale
        return (beta / self.unet_reg_reference_reward_scale) ** 2

    @property
    def regulariser_weight(self) -> float:
        """The output regulariser's weight at this reward scale: λ, or λ·(β/β_λ)² with ``unet_reg_reference_reward_scale``."""
        return self.unet_reg_scale * self.regulariser_scaling()

    @property
    def anchor_regulariser_weight(self) -> float:
        """The reference-anchored regulariser's weight at this reward scale: λ_ref, or λ_ref·(β/β_λ)² with ``unet_reg_reference_reward_scale``."""
        return self.unet_anchor_reg_scale * self.regulariser_scaling()

    @property
    def num_train_timesteps(self) -> int:
        """int(K·f) + 1 transitions per trajectory, capped at K: the last transition is always trained."""
        return min(self.sample_num_steps, int(self.sample_num_steps * self.train_timestep_fraction) + 1)
