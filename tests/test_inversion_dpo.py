"""Inversion-DPO: DDIM inversion maths (exact targets, reconstruction), the trajectory loss against an independent
computation with diffusers' scheduler, the sign on a separable toy preference, the cache and UNet-call counts, resume,
and the config checks."""

import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from trl_gfn import DiffusionPipelineForRL, InversionDPOConfig, InversionDPOTrainer
from trl_gfn.configs.inversion_dpo import INVERSION_DEFAULT_BETA
from trl_gfn.evaluation.unet_calls import UNetCallCounter
from trl_gfn.diffusion import ddim_schedule, ode_generate, ode_invert, trajectory_weights
from trl_gfn.testing import (
    brightness_preferences,
    full_and_resumed,
    full_and_resumed_inside_an_epoch,
    randomise_parameters,
    tiny_stable_diffusion,
)
from trl_gfn.trainers.inversion_dpo import stratified_steps

CAPTION = ("a handwritten digit",)


def config(tmp_path, **overrides):
    kwargs = dict(num_epochs=1, train_batch_size=4, logdir=str(tmp_path), run_name="run", save_freq=0, lora_rank=4, lr_warmup_steps=0,
                  train_learning_rate=1e-3, inversion_num_steps=6, beta=50.0)
    kwargs.update(overrides)
    return InversionDPOConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ inversion maths
def gaussian_eps(alphas_cumprod, var=0.25):
    """The exact noise prediction of data ~ N(0, var·I): ε̂(x, t) = √(1−ᾱ)·x / (ᾱ·var + 1 − ᾱ)."""
    def eps(x, t):
        a = alphas_cumprod[t].view(-1, 1, 1, 1).float()
        return (1 - a).sqrt() * x / (a * var + 1 - a)
    return eps


def test_inverted_targets_reproduce_the_trajectory_exactly_under_diffusers_ddim_step():
    """Each stored target ε*_i takes state i to state i+1 (and the last state to x_0) under DDIMScheduler.step with eta 0."""
    sched = DDIMScheduler.from_config(tiny_stable_diffusion().scheduler.config)
    schedule = ddim_schedule(sched, 8)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = ode_invert(gaussian_eps(sched.alphas_cumprod), x0, schedule)
    sched.set_timesteps(8)
    nxt = torch.cat([traj.states[:, 1:], x0[:, None]], dim=1)
    for i, t in enumerate(sched.timesteps):
        stepped = sched.step(traj.targets[:, i], t, traj.states[:, i], eta=0.0).prev_sample
        torch.testing.assert_close(stepped, nxt[:, i], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trajectory_weights(schedule), 0.5 / sched.alphas_cumprod[sched.timesteps].double())


def test_inversion_then_regeneration_converges_with_the_step_count():
    """Exact score of a Gaussian: the reconstruction error of invert + regenerate (eta 0) falls like 1/N."""
    sched = tiny_stable_diffusion().scheduler
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = gaussian_eps(sched.alphas_cumprod)
    errors = []
    for n in (10, 40, 160):
        schedule = ddim_schedule(sched, n)
        rec = ode_generate(eps, ode_invert(eps, x0, schedule).noise, schedule)
        errors.append(float((rec - x0).norm() / x0.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02 and errors[0] / errors[2] > 8, errors


def test_inversion_reconstructs_a_sample_of_the_bundled_model():
    """The bundled digits model, guided (CFG 2) like the trainer: a DDIM sample inverted and regenerated with the same model
    (eta 0) comes back within 8 % (latents) and 0.012 mean absolute pixel error (images std 0.31) at N = 40 (measured 5 % and
    0.007), and the error shrinks with N (measured 11 % / 5 % / 1.7 % at N = 10 / 40 / 160)."""
    from trl_gfn.data.digits_preferences import load_pipeline

    pipe = load_pipeline()
    emb, neg = pipe.encode_prompts(list(CAPTION) * 4), pipe.encode_prompts([""] * 4)
    errors = {}
    for n in (10, 40, 160):
        schedule = ddim_schedule(pipe.scheduler, n)

        def eps(x, t):
            return pipe.guided_epsilon(pipe.unet, x, t, emb, neg, 2.0, None, schedule.prediction_type)

        x0 = ode_generate(eps, torch.randn(4, *pipe.latent_shape, generator=torch.Generator().manual_seed(3)), schedule)
        rec = ode_generate(eps, ode_invert(eps, x0, schedule).noise, schedule)
        errors[n] = (float((rec - x0).norm() / x0.norm()), float((pipe.decode(rec) - pipe.decode(x0)).abs().mean()))
    assert errors[40][0] < 0.08 and errors[40][1] < 0.012, errors
    assert errors[10][0] > errors[40][0] > errors[160][0] and errors[160][0] < 0.03, errors


def test_schedule_step_index_maps_timesteps_to_positions_and_rejects_foreign_ones():
    """The inversion's noise level comes from its schedule's positions: each timestep maps to its own position; a timestep
    that is not a step of the schedule is an error, not position 0."""
    schedule = ddim_schedule(DDIMScheduler(num_train_timesteps=1000, steps_offset=1), 10)
    t = schedule.timesteps[torch.tensor([3, 0, 9, 3])]
    assert schedule.step_index(t).tolist() == [3, 0, 9, 3]
    with pytest.raises(ValueError, match="not steps of this schedule"):
        schedule.step_index(torch.tensor([int(schedule.timesteps[0]) + 1]))


def test_stratified_steps():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = stratified_steps(40, 4, g)
        assert [int(i) // 10 for i in idx] == [0, 1, 2, 3]
    assert stratified_steps(6, 6, g).tolist() == list(range(6))


# ------------------------------------------------------------------------------------------------ the loss
def independent_loss(trainer, batch, beta, n, w):
    """Inversion-DPO's loss from diffusers' pieces: VAE posterior mean, an inversion loop written from ᾱ (DDIMScheduler's
    timesteps), guided UNet calls with the adapter on/off, targets (x_i − coef_x·x_{i+1})... solved from the sampler step."""
    pipe = trainer.pipeline
    unet, vae = pipe.unet, pipe.vae
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(n)
    ts = sched.timesteps
    ac = sched.alphas_cumprod
    final = sched.final_alpha_cumprod
    emb = pipe.encode_prompts(batch.captions)
    neg = pipe.encode_prompts([""] * len(batch))

    def guided(x, t):
        out = unet(torch.cat([x, x]), t.repeat(2), encoder_hidden_states=torch.cat([neg, emb])).sample
        u, c = out.chunk(2)
        return u + w * (c - u)

    errs = {}
    for side, images in (("w", batch.winners), ("l", batch.losers)):
        x = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        states, targets = [], []
        with torch.no_grad():
            unet.disable_adapters()
            for i in reversed(range(n)):
                t = torch.full((len(batch),), int(ts[i]))
                a_t = ac[ts[i]]
                a_next = ac[ts[i + 1]] if i + 1 < n else final
                e = guided(x, t)
                x0_hat = (x - (1 - a_next).sqrt() * e) / a_next.sqrt()  # x is the state at a_next; go up to a_t
                x = a_t.sqrt() * x0_hat + (1 - a_t).sqrt() * e
                states.insert(0, x)
                targets.insert(0, e)
            ref = [guided(s, torch.full((len(batch),), int(ts[i]))) for i, s in enumerate(states)]
            unet.enable_adapters()
        pol = [guided(s, torch.full((len(batch),), int(ts[i]))) for i, s in enumerate(states)]
        weight = [0.5 / ac[ts[i]] for i in range(n)]
        errs["policy", side] = sum(weight[i] * F.mse_loss(pol[i], targets[i], reduction="none").mean(dim=[1, 2, 3]) for i in range(n)) / n
        errs["ref", side] = sum(weight[i] * F.mse_loss(ref[i], targets[i], reduction="none").mean(dim=[1, 2, 3]) for i in range(n)) / n
    inside = -0.5 * beta * ((errs["policy", "w"] - errs["ref", "w"]) - (errs["policy", "l"] - errs["ref", "l"]))
    # the size of the four error terms whose differences make `inside`: float32 rounding of the logit is relative to it
    scale = 0.5 * beta * sum(errs[key].abs() for key in errs)
    return -F.logsigmoid(inside).mean(), inside, scale.detach()


@pytest.mark.parametrize("sign", ["derived", "released"])
def test_loss_and_gradient_equal_an_independent_computation(tmp_path, sign):
    pipe = DiffusionPipelineForRL(tiny_stable_diffusion())
    trainer = InversionDPOTrainer(config(tmp_path, inversion_sign=sign), pipe, brightness_preferences(8))
    randomise_parameters([p for n, p in pipe.unet.named_parameters() if "lora_B" in n])
    idx = [0, 3, 5, 6]
    batch = trainer.train_pairs.load(idx)
    loss, terms = trainer.compute_loss(batch, trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], epoch=0))
    grads = torch.autograd.grad(loss, pipe.lora_parameters())
    expected, inside, scale = independent_loss(trainer, batch, 50.0, 6, 2.0)
    if sign == "released":
        expected = -F.logsigmoid(-inside).mean()
    expected_grads = torch.autograd.grad(expected, pipe.lora_parameters())
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3 * float(e.abs().max()))
    # logged with the derived sign. The logit is a difference of differences of terms ~scale; the two float32 computations
    # round those terms differently (by ~1e-7 relative, more on some CPUs than others), so the tolerance is relative to them
    assert terms["logit_mean"].item() == pytest.approx(inside.mean().item(), rel=1e-4, abs=4e-6 * scale.mean().item())
    assert inside.abs().max() > 0.01 and inside.std() > 0  # policy != reference: a non-trivial check


def brightness_run(tmp_path, sign):
    from trl_gfn.data.digits_preferences import load_pipeline

    c = config(tmp_path, num_epochs=3, train_batch_size=8, train_learning_rate=3e-3, inversion_num_steps=10, run_name=sign,
               inversion_sign=sign)
    trainer = InversionDPOTrainer(c, load_pipeline(), brightness_preferences(32, captions=CAPTION),
                                  eval_dataset=brightness_preferences(48, seed=1, captions=CAPTION))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    schedule = trainer.pipeline.make_schedule("ddpm", 20, 1.0)

    def brightness():
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(48)]
        return float(trainer.pipeline.sample(list(CAPTION) * 48, schedule, guidance_scale=3.0, generators=gens).images.mean())

    tuned = brightness()
    with trainer.pipeline.reference_mode():
        base = brightness()
    return before, after, tuned, base


def test_derived_sign_raises_the_winners_trajectory_likelihood_ratio_and_records_what_samples_do(tmp_path):
    """Brighter image preferred. The derived sign does what its derivation promises: on held-out pairs the winner's inverted
    trajectory becomes more likely relative to the loser's (implicit accuracy 1/2 -> >= 0.85, winner gap < loser gap).
    Measured here (docs/preference.md): its *samples* get darker, and the released code's sign makes them brighter."""
    before, after, tuned, base = brightness_run(tmp_path, "derived")
    assert before["implicit_acc"] == 0.5 and before["logit_mean"] == 0.0
    assert after["implicit_acc"] >= 0.85 and after["winner_gap"] < after["loser_gap"], after
    assert tuned < base - 0.03, (tuned, base)
    before, after, tuned, base = brightness_run(tmp_path, "released")
    assert after["implicit_acc"] <= 0.15, after  # the released sign ranks the trajectories the other way
    assert tuned > base + 0.03, (tuned, base)


# ------------------------------------------------------------------------------------------------ cost, cache, resume
@pytest.mark.parametrize("train_steps", [None, 2])
def test_cache_and_unet_calls_per_pair(tmp_path, train_steps):
    pipe = DiffusionPipelineForRL(tiny_stable_diffusion())
    trainer = InversionDPOTrainer(config(tmp_path, inversion_train_steps=train_steps), pipe, brightness_preferences(8))
    n, k = 6, train_steps or 6
    idx = [0, 1, 2, 3]
    batch = trainer.train_pairs.load(idx)
    for epoch, cold in ((0, True), (1, False)):
        with UNetCallCounter(pipe.unet) as calls:
            trainer.compute_loss(batch, trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], epoch))
        assert calls.grad == 4 * 2 * k * 2  # pairs x images x trained steps x CFG branches
        assert calls.no_grad == (4 * 2 * 2 * n * 2 if cold else 0)  # inversion + reference on the trajectory, then cached
    assert len(trainer._cache) == 8
    uncached = InversionDPOTrainer(config(tmp_path, inversion_cache=False, run_name="nc"), DiffusionPipelineForRL(tiny_stable_diffusion()),
                                   brightness_preferences(8))
    for _ in range(2):
        with UNetCallCounter(uncached.pipeline.unet) as calls:
            uncached.compute_loss(batch, uncached.pair_generators([uncached.train_pairs.rows[i] for i in idx], 0))
        assert calls.no_grad == 4 * 2 * 2 * 6 * 2
    assert not uncached._cache


@pytest.mark.parametrize("checkpointing", [False, True])
def test_steps_per_call_split_the_policy_calls_with_the_same_loss_and_gradient(tmp_path, checkpointing):
    """inversion_steps_per_call = 2 of K = 6: every policy call holds at most 2 steps of the 4 pairs' winners and losers (x 2 CFG
    branches; with gradient_checkpointing also in the backward's recomputation), and the loss and LoRA gradient are those of
    one call."""
    def run(per_call):
        pipe = DiffusionPipelineForRL(tiny_stable_diffusion())
        torch.manual_seed(0)
        randomise_parameters([p for n, p in pipe.unet.named_parameters() if "lora_B" in n])
        trainer = InversionDPOTrainer(config(tmp_path, run_name=f"c{per_call}", inversion_steps_per_call=per_call,
                                             gradient_checkpointing=checkpointing), pipe, brightness_preferences(8))
        idx = [0, 1, 2, 3]
        batch = trainer.train_pairs.load(idx)
        generators = trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], 0)
        trainer.compute_loss(batch, generators)  # the inversion and its cache, outside the counted calls
        sizes = []
        handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: sizes.append(int((a[0] if a else k["sample"]).shape[0])) if
                                                    torch.is_grad_enabled() else None, with_kwargs=True)
        loss, _ = trainer.compute_loss(batch, trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], 0))
        grads = torch.autograd.grad(loss, pipe.lora_parameters())
        handle.remove()
        return loss, grads, sizes

    whole, grads_whole, sizes_whole = run(None)
    split, grads_split, sizes_split = run(2)
    assert max(sizes_whole) == 4 * 2 * 6 * 2 and max(sizes_split) == 4 * 2 * 2 * 2
    assert sum(sizes_split) == sum(sizes_whole)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads_split, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))  # float32 summation order


def test_resume_is_exact_and_card_names_the_method(tmp_path):
    data = brightness_preferences(16)

    def trainer(run, **kw):
        c = config(tmp_path, num_epochs=2, save_freq=1, run_name=run, inversion_train_steps=3, **kw)
        return InversionDPOTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), data)

    full, resumed = full_and_resumed(trainer, tmp_path, 1)
    for a, b in zip(full.pipeline.lora_parameters(), resumed.pipeline.lora_parameters()):
        assert torch.equal(a, b)
    card = open(os.path.join(str(tmp_path), "full", "final", "README.md"), encoding="utf-8").read()
    assert "Inversion-DPO" in card and "2507.11554" in card and "inversion_num_steps" in card
    assert full.last_metrics["inversion/cached_images"] == 32


def test_resume_inside_an_epoch_is_exact(tmp_path):
    """From a save_steps checkpoint: the inversion cache starts empty again; the images trained before the checkpoint are
    inverted again in other batches (float rounding depends on the batch size), so the run agrees to rounding."""
    data = brightness_preferences(16)

    def trainer(run, **kw):
        c = config(tmp_path, num_epochs=2, run_name=run, inversion_train_steps=3, **kw)
        return InversionDPOTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), data)

    full, resumed = full_and_resumed_inside_an_epoch(trainer, tmp_path)
    assert resumed.state.global_step == full.state.global_step == 8
    moved = False
    for a, b, start in zip(full.pipeline.lora_parameters(), resumed.pipeline.lora_parameters(),
                           InversionDPOTrainer(config(tmp_path, run_name="init"), DiffusionPipelineForRL(tiny_stable_diffusion()),
                                               data).pipeline.lora_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        moved = moved or float((a - start).abs().max()) > 1e-3
    assert moved  # the comparison is between trained weights, not the initial ones


def test_config_checks():
    assert InversionDPOConfig().effective_beta == INVERSION_DEFAULT_BETA and InversionDPOConfig().inversion_num_steps == 40
    assert InversionDPOConfig().inversion_guidance_scale == 2.0
    with pytest.raises(ValueError, match="inversion_num_steps: must be an integer >= 1, got 0"):
        InversionDPOConfig(inversion_num_steps=0)
    with pytest.raises(ValueError, match="inversion_train_steps: must be at most inversion_num_steps=4"):
        InversionDPOConfig(inversion_num_steps=4, inversion_train_steps=5)
    with pytest.raises(ValueError, match="inversion_train_steps: must be an integer >= 1"):
        InversionDPOConfig(inversion_train_steps=0)
    with pytest.raises(ValueError, match="inversion_guidance_scale"):
        InversionDPOConfig(inversion_guidance_scale=0.5)
    with pytest.raises(ValueError, match="random_flip: must be False"):
        InversionDPOConfig(random_flip=True)
    with pytest.raises(ValueError, match="winner_preserving_mu: is not supported"):
        InversionDPOConfig(winner_preserving_mu=0.9)
    with pytest.raises(ValueError, match="inversion_sign"):
        InversionDPOConfig(inversion_sign="flipped")
    with pytest.raises(ValueError, match="num_steps"):
        ddim_schedule(tiny_stable_diffusion().scheduler, 0)
