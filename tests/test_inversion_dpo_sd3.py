"""Inversion-DPO on SD3 (flow matching): the Euler-ODE inversion against diffusers' FlowMatchEulerDiscreteScheduler (exact
targets, reconstruction converging with N, also through the tiny transformer), the velocity weight against the
variance-preserving equivalent of the DDPM weight, the loss against an independent computation, training on a toy
preference, the LoRA reload with StableDiffusion3Pipeline.load_lora_weights and the exact resume."""

import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from trl_gfn import DiffusionPipelineForRL, InversionDPOConfig, InversionDPOTrainer
from trl_gfn.diffusion import NoiseLevel, deterministic_schedule, ode_generate, ode_invert, trajectory_weights
from trl_gfn.testing import brightness_preferences, full_and_resumed, randomise_parameters, tiny_stable_diffusion_3

SIZE = 16  # images 16 x 16, latents 8 x 8


def config(tmp_path, **overrides):
    kwargs = dict(num_epochs=1, train_batch_size=4, logdir=str(tmp_path), run_name="run", save_freq=0, lora_rank=4, lr_warmup_steps=0,
                  train_learning_rate=1e-3, inversion_num_steps=5, beta=50.0)
    kwargs.update(overrides)
    return InversionDPOConfig(**kwargs)


def wrap(seed=0):
    return DiffusionPipelineForRL(tiny_stable_diffusion_3(seed=seed), height=SIZE, width=SIZE)


def gaussian_velocity(var=0.25):
    """The exact velocity E[ε − x_0 | x] of data ~ N(0, var·I) at x = (1 − σ) x_0 + σ ε, σ = t / 1000:
    (σ − (1 − σ)·var)·x / ((1 − σ)²·var + σ²)."""
    def velocity(x, t):
        s = (t.float() / 1000).view(-1, 1, 1, 1)
        return (s - (1 - s) * var) * x / ((1 - s) ** 2 * var + s**2)
    return velocity


# ------------------------------------------------------------------------------------------------ the Euler-ODE inversion
def test_flow_inversion_targets_reproduce_the_trajectory_exactly_under_flow_match_euler_step():
    """deterministic_schedule on SD3's scheduler is the Euler ODE (coef_x 1, coef_eps σ_next − σ, std 0); each stored v_inv
    takes state i exactly to state i+1 (the last to x_0) under diffusers' FlowMatchEulerDiscreteScheduler.step."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = deterministic_schedule(scheduler, 8)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(8)
    sigmas = reference.sigmas.double()
    assert schedule.prediction_type == "flow" and schedule.deterministic
    torch.testing.assert_close(schedule.coef_x, torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(schedule.coef_eps, sigmas[1:] - sigmas[:-1])
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = ode_invert(gaussian_velocity(), x0, schedule)
    assert float(schedule.noise[0]) == 1.0  # the first inverted state sits at σ = 1
    nxt = torch.cat([traj.states[:, 1:], x0[:, None]], dim=1)
    for i, t in enumerate(reference.timesteps):
        stepped = reference.step(traj.targets[:, i], t, traj.states[:, i]).prev_sample
        torch.testing.assert_close(stepped, nxt[:, i], rtol=1e-5, atol=1e-5)
    # and each target is the velocity at the known end state (the inversion approximation), at the step's own timestep
    for i in range(8):
        torch.testing.assert_close(traj.targets[:, i], gaussian_velocity()(nxt[:, i], schedule.timesteps[i].expand(3)))


def test_flow_inversion_then_regeneration_converges_with_the_step_count():
    """The exact velocity of Gaussian data: the reconstruction error of invert + regenerate falls like 1/N (measured 12 % /
    2.7 % / 0.7 % at N = 10 / 40 / 160)."""
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    v = gaussian_velocity()
    errors = []
    for n in (10, 40, 160):
        schedule = deterministic_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), n)
        rec = ode_generate(v, ode_invert(v, x0, schedule).noise, schedule)
        errors.append(float((rec - x0).norm() / x0.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01 and errors[0] / errors[2] > 8, errors


def test_inversion_through_the_tiny_sd3_transformer_reconstructs_the_latent(tmp_path):
    """The trainer's own guided velocity (reference, CFG 2) on the tiny SD3: an image's inversion regenerates its latent,
    the error falling like 1/N (measured 31 % / 6.8 % / 1.7 % at N = 5 / 20 / 80)."""
    trainer = InversionDPOTrainer(config(tmp_path), wrap(), brightness_preferences(4))
    pipe = trainer.pipeline
    batch = trainer.train_pairs.load([0, 1])
    latents = pipe.encode_images(batch.winners, posterior_mean=True)
    embeds = pipe.encode_prompts(batch.captions)
    errors = []
    for n in (5, 20, 80):
        trainer.inversion_schedule = deterministic_schedule(pipe.scheduler, n)
        with pipe.reference_mode():
            def v(x, t):
                return trainer.guided_eps(pipe.denoiser, x, t, embeds)

            rec = ode_generate(v, ode_invert(v, latents, trainer.inversion_schedule).noise, trainer.inversion_schedule)
        errors.append(float((rec - latents).norm() / latents.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.025 and errors[0] / errors[2] > 8, errors


# ------------------------------------------------------------------------------------------------ the weight
def test_velocity_weight_equals_the_vp_equivalent_ddpm_weight():
    """Dividing x = (1 − σ) x_0 + σ ε by s = sqrt((1 − σ)² + σ²) gives a VP state with ᾱ = (1 − σ)²/s² and the same ε. Take a
    velocity prediction v̂ and target v*, turn each into the VP model's ε-prediction with the same x̂_0 (x̂_0 = x − σ v, then
    ε = (x̃ − sqrt(ᾱ) x̂_0)/sqrt(1 − ᾱ), written from the VP side only): 1/(2ᾱ)·mean(ε̂ − ε*)² equals the velocity weight
    ((1 − σ)² + σ²)/2 times mean(v̂ − v*)², for every σ in (0, 1); at σ = 1 the velocity weight is 1/2 (finite)."""
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64).view(-1, 1, 1, 1)
    x0, eps = torch.randn(7, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(7, 4, 8, 8, generator=g, dtype=torch.float64)
    x = (1 - sigma) * x0 + sigma * eps
    v_hat, v_star = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(x.shape, generator=g, dtype=torch.float64)
    s = ((1 - sigma) ** 2 + sigma**2).sqrt()
    alpha_bar = (1 - sigma) ** 2 / s**2
    x_vp = x / s
    torch.testing.assert_close(x_vp, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps)  # a VP state with the same ε

    def vp_epsilon(v):
        return (x_vp - alpha_bar.sqrt() * (x - sigma * v)) / (1 - alpha_bar).sqrt()

    vp_weighted = (vp_epsilon(v_hat) - vp_epsilon(v_star)).pow(2).mean(dim=(1, 2, 3)) / (2 * alpha_bar.flatten())
    level = NoiseLevel(1 - sigma, sigma, "velocity")
    ours = level.inversion_weight().flatten() * (v_hat - v_star).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ours, vp_weighted, rtol=1e-10, atol=0)
    torch.testing.assert_close(level.inversion_weight(), ((1 - sigma) ** 2 + sigma**2) / 2)
    one = NoiseLevel(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), "velocity")
    assert float(one.inversion_weight()) == 0.5
    # the schedule's weights: ((1 − σ_i)² + σ_i²)/2 at the start state of every step, σ_0 = 1 included
    schedule = deterministic_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 6)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(6)
    sig = reference.sigmas[:-1].double()
    torch.testing.assert_close(trajectory_weights(schedule), ((1 - sig) ** 2 + sig**2) / 2)
    assert bool(torch.isfinite(trajectory_weights(schedule)).all()) and float(trajectory_weights(schedule)[0]) == 0.5


# ------------------------------------------------------------------------------------------------ the loss
def independent_loss(trainer, batch, beta, n, w):
    """Inversion-DPO's loss on SD3 from diffusers' pieces: VAE posterior mean with SD3's shift and scale, an Euler inversion
    loop written from FlowMatchEulerDiscreteScheduler's sigmas, guided transformer calls with the adapter off / on, velocity
    targets, weights ((1 − σ)² + σ²)/2."""
    pipe = trainer.pipeline
    sd3 = pipe.pipeline
    transformer, vae = sd3.transformer, sd3.vae
    sched = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config)
    sched.set_timesteps(n)
    sigmas = sched.sigmas
    emb, _, pooled, _ = sd3.encode_prompt(batch.captions, None, None, do_classifier_free_guidance=False, max_sequence_length=12)
    neg, _, neg_pooled, _ = sd3.encode_prompt([""] * len(batch), None, None, do_classifier_free_guidance=False, max_sequence_length=12)

    def guided(x, i):
        t = (sigmas[i] * 1000).expand(2 * len(x))
        out = transformer(torch.cat([x, x]), encoder_hidden_states=torch.cat([neg, emb]), pooled_projections=torch.cat([neg_pooled, pooled]),
                          timestep=t).sample
        u, c = out.chunk(2)
        return u + w * (c - u)

    errs = {}
    for side, images in (("w", batch.winners), ("l", batch.losers)):
        x = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        states, targets = [], []
        with torch.no_grad():
            transformer.disable_adapters()
            for i in reversed(range(n)):
                v = guided(x, i)
                x = x - (sigmas[i + 1] - sigmas[i]) * v
                states.insert(0, x)
                targets.insert(0, v)
            ref = [guided(s, i) for i, s in enumerate(states)]
            transformer.enable_adapters()
        pol = [guided(s, i) for i, s in enumerate(states)]
        weight = [((1 - sigmas[i]) ** 2 + sigmas[i] ** 2) / 2 for i in range(n)]
        errs["policy", side] = sum(weight[i] * F.mse_loss(pol[i], targets[i], reduction="none").mean(dim=[1, 2, 3]) for i in range(n)) / n
        errs["ref", side] = sum(weight[i] * F.mse_loss(ref[i], targets[i], reduction="none").mean(dim=[1, 2, 3]) for i in range(n)) / n
    inside = -0.5 * beta * ((errs["policy", "w"] - errs["ref", "w"]) - (errs["policy", "l"] - errs["ref", "l"]))
    # the size of the four error terms whose differences make `inside`: float32 rounding of the logit is relative to it
    scale = 0.5 * beta * sum(errs[key].abs() for key in errs)
    return -F.logsigmoid(inside).mean(), inside, scale.detach()


def test_loss_and_gradient_equal_an_independent_computation_on_sd3(tmp_path):
    pipe = wrap()
    trainer = InversionDPOTrainer(config(tmp_path), pipe, brightness_preferences(8))
    assert trainer.inversion_schedule.prediction_type == "flow"
    randomise_parameters([p for n, p in pipe.denoiser.named_parameters() if "lora_B" in n], scale=0.2)
    idx = [0, 3, 5, 6]
    batch = trainer.train_pairs.load(idx)
    loss, terms = trainer.compute_loss(batch, trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], epoch=0))
    grads = torch.autograd.grad(loss, pipe.lora_parameters())
    expected, inside, scale = independent_loss(trainer, batch, 50.0, 5, 2.0)
    expected_grads = torch.autograd.grad(expected, pipe.lora_parameters())
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3 * float(e.abs().max()))
    # a difference of differences of terms ~scale, rounded differently by the two float32 computations (CPU-dependent)
    assert terms["logit_mean"].item() == pytest.approx(inside.mean().item(), rel=1e-4, abs=4e-6 * scale.mean().item())
    assert inside.abs().max() > 1e-3 and inside.std() > 0  # policy != reference: a non-trivial check


# ------------------------------------------------------------------------------------------------ training, reload, resume
def test_trains_on_a_toy_preference_and_the_lora_reloads_in_stable_diffusion_3_pipeline(tmp_path):
    """Brighter image preferred: on held-out pairs the winner's inverted trajectory becomes more likely relative to the
    loser's (implicit accuracy 1/2 -> >= 0.75; measured 0.81 / 0.88 / 0.88 on model seeds 0 / 1 / 2: the tiny random
    transformer's LoRA fits less than the bundled SD 1.5 model's, >= 0.85 there); the final LoRA loads with
    StableDiffusion3Pipeline.load_lora_weights and samples as the trained model does."""
    c = config(tmp_path, num_epochs=3, train_batch_size=8, train_learning_rate=3e-2, inversion_num_steps=6)
    trainer = InversionDPOTrainer(c, wrap(), brightness_preferences(32), eval_dataset=brightness_preferences(48, seed=1))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["implicit_acc"] == 0.5 and before["logit_mean"] == 0.0
    assert after["implicit_acc"] >= 0.75 and after["winner_gap"] < after["loser_gap"], after
    assert trainer.state.global_step == 12 and trainer.last_metrics["inversion/cached_images"] == 64 + 96

    plain = tiny_stable_diffusion_3()
    plain.load_lora_weights(trainer.output_dir)
    reloaded = DiffusionPipelineForRL(plain, height=SIZE, width=SIZE)
    schedule = trainer.pipeline.make_schedule("auto", 3, noise_level=0.0)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    mine = trainer.pipeline.sample(["a cat", "a dog"], schedule, guidance_scale=2.0, generators=gens, decode=False).latents
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    theirs = reloaded.sample(["a cat", "a dog"], schedule, guidance_scale=2.0, generators=gens, decode=False).latents
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
    with trainer.pipeline.reference_mode():
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        base = trainer.pipeline.sample(["a cat", "a dog"], schedule, guidance_scale=2.0, generators=gens, decode=False).latents
    assert (base - mine).abs().max() > 1e-3  # the LoRA changed the model, so the comparison can fail


def test_resume_on_sd3_is_exact(tmp_path):
    data = brightness_preferences(16)

    def trainer(run, **kw):
        return InversionDPOTrainer(config(tmp_path, num_epochs=2, save_freq=1, run_name=run, inversion_train_steps=3, **kw), wrap(), data)

    full, resumed = full_and_resumed(trainer, tmp_path, 1)
    assert full.state.global_step == resumed.state.global_step == 8
    for a, b in zip(full.pipeline.lora_parameters(), resumed.pipeline.lora_parameters()):
        assert torch.equal(a, b)
    assert any(float(p.detach().abs().max()) > 0 for n, p in full.pipeline.denoiser.named_parameters() if "lora_B" in n)
    assert "Inversion-DPO" in open(os.path.join(str(tmp_path), "full", "final", "README.md"), encoding="utf-8").read()
