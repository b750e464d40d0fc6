"""Per-step coefficients of a stochastic sampler, read off a diffusers scheduler.

Every sampler step supported here is a Gaussian whose mean is linear in the current state and in
the (guided) noise prediction::

    x_{k-1} = coef_x[i] * x_k + coef_eps[i] * eps_hat + std[i] * z,     z ~ N(0, I)

where ``i = K - k`` is the position in sampling order (``i = 0`` is the first, noisiest step). The
trainers use these coefficients both to sample and to score transitions, so that what is trained is
exactly what was sampled; `tests/test_diffusion_schedule.py` checks them against ``scheduler.step``.

Here ``eps_hat`` is the sampler's *prediction*: the noise prediction for the UNet samplers, the velocity for the
flow sampler (:mod:`trl_gfn.diffusion.noise_level`). Every state also has a noise level x = signal·x_0 + noise·ε
(:meth:`TransitionSchedule.level`), from which the trainers take x̂_0, the flow-guess weight γ, etc.

Supported samplers:
- ``ddpm``: :class:`~diffusers.DDIMScheduler` with ``eta > 0`` (``eta = 1`` is DDPM's posterior);
- ``dpm_solver_sde``: :class:`~diffusers.DPMSolverMultistepScheduler` with
  ``algorithm_type="sde-dpmsolver++"``, first order (``solver_order=1``), ``final_sigmas_type="sigma_min"``
  so that the last step stays stochastic (a deterministic step has no log-density to train on);
- ``flow_sde``: a flow-matching model's :class:`~diffusers.FlowMatchEulerDiscreteScheduler` sigmas with Flow-GRPO's
  marginal-preserving SDE step at ``noise_level`` a (:mod:`trl_gfn.diffusion.flow_matching`); ``noise_level = 0`` is
  the deterministic Euler ODE (``FlowMatchEulerDiscreteScheduler.step``), for gradient-through-sampler methods only.

The UNet samplers are variance-preserving; ``flow_sde`` needs a flow-matching model (``prediction_type="flow"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from .noise_level import NoiseLevel

#: samplers of variance-preserving (UNet) models
VP_SAMPLERS = ("ddpm", "dpm_solver_sde")
#: samplers of flow-matching models
FLOW_SAMPLERS = ("flow_sde",)
SUPPORTED_SAMPLERS = (*VP_SAMPLERS, *FLOW_SAMPLERS)
#: what a config's ``sampler`` may say: a sampler, or ``auto`` (the model family's stochastic sampler)
SAMPLER_CHOICES = ("auto", *SUPPORTED_SAMPLERS)
#: Flow-GRPO's default SDE noise level a
DEFAULT_FLOW_NOISE_LEVEL = 0.7
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class TransitionSchedule:
    """Coefficients of the K sampling steps, indexed in sampling order ``i = 0 .. K-1``.

    Attributes:
        timesteps: (K,) denoiser timesteps ``tau`` of the state each step starts from (int64 for the UNet samplers,
            float32 σ·1000 for the flow sampler, as diffusers passes them).
        alphas_cumprod: (K + 1,) float64 ``alpha_bar`` of every state in sampling order; the last entry
            belongs to the final sample ``x_0`` (the scheduler's final alpha). For a flow schedule, the
            variance-preserving equivalent (1 − σ)² / ((1 − σ)² + σ²) (:attr:`NoiseLevel.alpha_bar`).
        coef_x, coef_eps, std: (K,) float64 mean/std coefficients of each step (see module docstring); ``coef_eps``
            multiplies the sampler's prediction (ε̂, or the velocity for a flow schedule).
        prediction_type: the denoiser's prediction type (``epsilon``, ``v_prediction``, ``sample``, or ``flow`` for a
            flow-matching model's velocity), used to turn its output into the sampler's prediction.
        signal, noise: (K + 1,) float64 scales of every state x = signal·x_0 + noise·ε in sampling order (default: from
            ``alphas_cumprod``, sqrt(ᾱ) and sqrt(1 − ᾱ)); 1 − σ and σ for a flow schedule.
        noise_level: the flow SDE's noise level a (None for the UNet samplers); 0 is the deterministic ODE.
    """

    timesteps: torch.Tensor
    alphas_cumprod: torch.Tensor
    coef_x: torch.Tensor
    coef_eps: torch.Tensor
    std: torch.Tensor
    prediction_type: str = "epsilon"
    signal: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    noise_level: float | None = None

    def __post_init__(self):
        if self.signal is None:
            self.signal = self.alphas_cumprod.sqrt()
        if self.noise is None:
            self.noise = (1 - self.alphas_cumprod).clamp(min=0).sqrt()

    @property
    def parameterisation(self) -> str:
        """``"velocity"`` for a flow schedule (its prediction is the velocity), else ``"epsilon"``."""
        return "velocity" if self.prediction_type == "flow" else "epsilon"

    @property
    def deterministic(self) -> bool:
        """Whether every step has std 0 (the flow ODE): such a sampler has no transition density."""
        return bool((self.std == 0).all())

    def step_index(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Sampling positions (long, like ``timesteps``) of per-sample ``timesteps``, each one of this schedule's;
        ``ValueError`` otherwise."""
        match = timesteps.view(-1, 1) == self.timesteps.to(timesteps.device).view(1, -1)
        if not bool(match.any(dim=1).all()):
            raise ValueError(f"timesteps {timesteps[~match.any(dim=1)].tolist()[:5]} are not steps of this schedule {self.timesteps.tolist()}")
        return match.int().argmax(dim=1)

    def level(self, step_index: torch.Tensor, *, like: torch.Tensor) -> NoiseLevel:
        """The :class:`NoiseLevel` of the states at sampling positions ``step_index`` (0 = initial noise, K = the sample),
        broadcast like ``like``."""
        return NoiseLevel(self.gather("signal", step_index, like=like), self.gather("noise", step_index, like=like), self.parameterisation)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def next_timesteps(self) -> torch.Tensor:
        """(K,) timestep of the state each step lands on (0 for the final sample ``x_0``)."""
        return torch.cat([self.timesteps[1:], self.timesteps.new_zeros(1)])

    def gather(self, name: str, step_index: torch.Tensor, *, like: torch.Tensor) -> torch.Tensor:
        """Pick attribute ``name`` at per-sample positions ``step_index`` and broadcast it like ``like``."""
        values = getattr(self, name).to(step_index.device)[step_index]
        values = values.to(like.dtype) if values.is_floating_point() else values
        return values.view(-1, *([1] * (like.ndim - 1))).to(like.device)


def make_scheduler(base_scheduler, sampler: str, eta: float = 1.0):
    """A scheduler of the requested sampler built from ``base_scheduler``'s config (betas, offsets…).

    Raises ``ValueError`` for an unknown ``sampler``, a flow sampler on a variance-preserving scheduler or the
    reverse, or for scheduler options that change the step in ways the transition maths does not model
    (thresholding, sample clipping, Karras sigmas…).
    """
    if sampler not in SUPPORTED_SAMPLERS:
        raise ValueError(f"sampler must be one of {SUPPORTED_SAMPLERS}, got {sampler!r}")
    is_flow = isinstance(base_scheduler, FlowMatchEulerDiscreteScheduler)
    if is_flow != (sampler in FLOW_SAMPLERS):
        kind = "a flow-matching model's FlowMatchEulerDiscreteScheduler" if is_flow else f"a {type(base_scheduler).__name__}"
        fits = FLOW_SAMPLERS if is_flow else VP_SAMPLERS
        raise ValueError(f"sampler {sampler!r} does not fit {kind}; use one of {fits} (or 'auto')")
    if is_flow:
        for option in ("stochastic_sampling", "invert_sigmas", "use_dynamic_shifting"):
            if base_scheduler.config.get(option, False):
                raise ValueError(f"FlowMatchEulerDiscreteScheduler option {option}=True is not supported by the flow_sde sampler")
        return FlowMatchEulerDiscreteScheduler.from_config(base_scheduler.config)
    config = dict(base_scheduler.config)
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported; expected one of {SUPPORTED_PREDICTION_TYPES}")
    if config.get("thresholding", False):
        raise ValueError("schedulers with thresholding=True are not supported: the step would not be Gaussian in the model output")
    if sampler == "ddpm":
        if eta <= 0:
            raise ValueError(f"sample_eta must be > 0 for a stochastic DDIM/DDPM step, got {eta}")
        if config.get("set_alpha_to_one", False):
            raise ValueError("scheduler config set_alpha_to_one=True makes the last DDIM step deterministic (ᾱ_prev = 1, std 0): it has no "
                             "log-density to train on (DDPO's ratio and the ∇-DB residuals divide by it). Use set_alpha_to_one=False, as "
                             "the Stable Diffusion 1.x/2.x and SDXL scheduler configs do")
        # a base scheduler without the key (another class) gets False: the final ᾱ is that of the first train timestep
        scheduler = DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
    else:
        for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
            if config.get(option, False):
                raise ValueError(f"dpm_solver_sde does not support scheduler option {option}=True")
        scheduler = DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="sde-dpmsolver++", solver_order=1, final_sigmas_type="sigma_min", thresholding=False
        )
    return scheduler


def transition_schedule(scheduler, num_steps: int, eta: float = 1.0, device: torch.device | str = "cpu",
                        noise_level: float = DEFAULT_FLOW_NOISE_LEVEL) -> TransitionSchedule:
    """Compute the :class:`TransitionSchedule` of ``scheduler`` for ``num_steps`` inference steps.

    ``scheduler`` must come from :func:`make_scheduler` (a stochastic DDIM, a first-order SDE-DPM-Solver++, or a
    ``FlowMatchEulerDiscreteScheduler``). ``eta`` applies to DDIM only, ``noise_level`` (the SDE's a; 0: the Euler
    ODE) to the flow scheduler only. Calls ``scheduler.set_timesteps(num_steps)``.
    """
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return flow_schedule(scheduler, num_steps, noise_level, device)
    scheduler.set_timesteps(num_steps, device="cpu")
    timesteps = scheduler.timesteps.to(torch.int64).clone()
    prediction_type = scheduler.config.prediction_type
    if isinstance(scheduler, DDIMScheduler):
        ac = scheduler.alphas_cumprod.to(torch.float64)
        final = torch.tensor(float(scheduler.final_alpha_cumprod), dtype=torch.float64)
        step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        prev = timesteps - step
        a_t = ac[timesteps]
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * variance.sqrt()
        # mean = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std^2) * eps, x0_hat = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
        coef_x = (a_prev / a_t).sqrt()
        coef_eps = (1 - a_prev - std**2).clamp(min=0).sqrt() - (a_prev * (1 - a_t) / a_t).sqrt()
        alphas = torch.cat([a_t, a_prev[-1:]])
        if eta > 0 and bool((std <= 0).any()):
            dead = [int(timesteps[i]) for i in (std <= 0).nonzero().flatten().tolist()]
            raise ValueError(f"the DDIM steps from timestep(s) {dead} are deterministic (std 0): ᾱ does not change over them (a step "
                             "starting at timestep 0, e.g. steps_offset=0 with 'leading' spacing, or set_alpha_to_one=True). A "
                             "deterministic step has no log-density to train on; use the Stable Diffusion scheduler settings "
                             "(steps_offset=1, set_alpha_to_one=False)")
    elif isinstance(scheduler, DPMSolverMultistepScheduler):
        if scheduler.config.algorithm_type != "sde-dpmsolver++" or scheduler.config.solver_order != 1:
            raise ValueError("only the first-order sde-dpmsolver++ DPM-Solver step is supported; build it with make_scheduler")
        sigmas = scheduler.sigmas.to(torch.float64)  # (K + 1,) in the sqrt((1 - a) / a) parameterisation
        if float(sigmas[-1]) == 0.0:
            raise ValueError("final_sigmas_type='zero' makes the last DPM-Solver step deterministic; use 'sigma_min'")
        alpha = 1 / (sigmas**2 + 1).sqrt()
        sigma = sigmas * alpha
        lam = alpha.log() - sigma.log()
        h = lam[1:] - lam[:-1]
        # x_s = (sigma_s / sigma_t) e^{-h} x + alpha_s (1 - e^{-2h}) x0_hat + sigma_s sqrt(1 - e^{-2h}) z
        a_x0 = alpha[1:] * (1 - torch.exp(-2 * h))
        coef_x = sigma[1:] / sigma[:-1] * torch.exp(-h) + a_x0 / alpha[:-1]
        coef_eps = -a_x0 * sigma[:-1] / alpha[:-1]
        std = sigma[1:] * (1 - torch.exp(-2 * h)).sqrt()
        alphas = alpha**2
    else:
        raise ValueError(
            f"unsupported scheduler {type(scheduler).__name__}; use trl_gfn.diffusion.make_scheduler "
            f"with one of {SUPPORTED_SAMPLERS}"
        )
    device = torch.device(device)
    return TransitionSchedule(
        timesteps=timesteps.to(device),
        alphas_cumprod=alphas.to(device),
        coef_x=coef_x.to(device),
        coef_eps=coef_eps.to(device),
        std=std.to(device),
        prediction_type=prediction_type,
    )


def flow_schedule(scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, noise_level: float = DEFAULT_FLOW_NOISE_LEVEL,
                  device: torch.device | str = "cpu") -> TransitionSchedule:
    """The flow sampler (:func:`~trl_gfn.diffusion.flow_transition_schedule`) as a :class:`TransitionSchedule` whose
    prediction is the velocity (``prediction_type="flow"``): coef_eps = coef_v, signal = 1 − σ, noise = σ."""
    from .flow_matching import flow_transition_schedule

    flow = flow_transition_schedule(scheduler, num_steps, noise_level, device="cpu")
    signal, noise = 1 - flow.sigmas, flow.sigmas
    device = torch.device(device)
    return TransitionSchedule(
        timesteps=flow.timesteps.float().to(device),
        alphas_cumprod=(signal**2 / (signal**2 + noise**2)).to(device),
        coef_x=flow.coef_x.to(device),
        coef_eps=flow.coef_v.to(device),
        std=flow.std.to(device),
        prediction_type="flow",
        signal=signal.to(device),
        noise=noise.to(device),
        noise_level=flow.noise_level,
    )
