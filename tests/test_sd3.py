"""SD3 (flow matching) through the model-family interface: the flow transition against diffusers' FlowMatchEulerDiscreteScheduler
and an independent SDE computation, prompt conditioning and sampling against StableDiffusion3Pipeline, every trainer end to end
(one update, reward rise, LoRA reload in diffusers' SD3 format, exact resume), and the sampler/method combinations refused."""

import math
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from trl_gfn import (AlignPropConfig, AlignPropTrainer, DDPOConfig, DDPOTrainer, DiffusionDPOConfig, DiffusionDPOTrainer, DiffusionPipelineForRL,
                     DRaFTConfig, DRaFTTrainer, NablaGFlowNetConfig, NablaGFlowNetTrainer, ReFLConfig, ReFLTrainer)
from trl_gfn.diffusion import ForwardProcess, NoiseLevel, flow_sde_noise_scale, predict_x0, step_mean, velocity_to_x0
from trl_gfn.pipelines import StableDiffusion3Family
from trl_gfn.testing import BrightnessReward, brightness_preferences, tiny_stable_diffusion, tiny_stable_diffusion_3

from family_harness import COMMON, PROMPTS, FamilyHarness, generators

H, W = 16, 32  # non-square: latents 8 x 16
MODEL_SEED = 0
# per trainer: config class, trainer class, config overrides, epochs for the reward rise. The tiny transformer's output moves
# little per LoRA step: learning rates are 5x the SDXL test's (measured gains at 5e-2, model seed 0: +0.003 to +0.005, > 10
# standard errors). DDPO's 8-sample policy gradient does not raise brightness at Flow-GRPO's noise level 0.7 on this random model
# (measured +0.0003 on seed 0, -0.0001 to +0.0002 on seeds 1-4: too little exploration for 8 samples); at the memoryless level
# sqrt(2) it does on seed 0 (+0.0027; seeds 1, 2: +0.0004, -0.0001), which is what this test uses.
SETTINGS = {
    "nabla_gfn": (NablaGFlowNetConfig, NablaGFlowNetTrainer, dict(sample_num_steps=6, sample_batch_size=8, flow_block_out_channels=[8, 16],
                                                                   flow_attention_head_dim=4, reward_scale=1e6, unet_reg_scale=0.0,
                                                                   train_timestep_fraction=0.34, train_learning_rate=5e-2), 3),
    "ddpo": (DDPOConfig, DDPOTrainer, dict(sample_num_steps=6, sample_batch_size=8, train_learning_rate=3e-2, train_clip_range=0.5,
                                           sample_noise_level=1.4), 6),
    # Flow-GRPO: DDPO's settings with groups of 4 samples per prompt, group-relative advantages and a weak KL to the reference
    "flow_grpo": (DDPOConfig, DDPOTrainer, dict(sample_num_steps=6, sample_batch_size=8, train_learning_rate=3e-2, train_clip_range=0.5,
                                                sample_noise_level=1.4, sample_group_size=4, group_relative_advantages=True,
                                                kl_reference_scale=0.01), 6),
    "draft": (DRaFTConfig, DRaFTTrainer, dict(sample_num_steps=5, sample_num_batches_per_epoch=2, train_learning_rate=5e-2), 3),
    # DRaFT through the deterministic Euler ODE (noise level 0), as reward backpropagation is usually run on flow models
    "draft_ode": (DRaFTConfig, DRaFTTrainer, dict(sample_num_steps=5, sample_num_batches_per_epoch=2, train_learning_rate=5e-2,
                                                  sample_noise_level=0.0, draft_k=2), 3),
    "alignprop": (AlignPropConfig, AlignPropTrainer, dict(sample_num_steps=5, sample_num_batches_per_epoch=2, train_learning_rate=5e-2), 3),
    "refl": (ReFLConfig, ReFLTrainer, dict(sample_num_steps=10, sample_num_batches_per_epoch=2, train_learning_rate=5e-2,
                                          refl_timestep_range=[0, 300]), 3),
}


HARNESS = FamilyHarness(tiny_stable_diffusion_3, H, W, MODEL_SEED, SETTINGS)
wrap, make = HARNESS.wrap, HARNESS.make


# ---------------------------------------------------------------------------------------------------- transition maths
def test_ode_schedule_steps_equal_flow_match_euler_scheduler_step():
    """noise level 0: every step's mean coef_x·x + coef_eps·v is FlowMatchEulerDiscreteScheduler.step, std 0."""
    wrapper = wrap()
    schedule = wrapper.make_schedule("auto", 7, noise_level=0.0)
    assert schedule.prediction_type == "flow" and schedule.parameterisation == "velocity" and schedule.deterministic
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(7)
    torch.testing.assert_close(schedule.timesteps.float(), reference.timesteps.float(), rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 16, generator=g)
    for i, t in enumerate(reference.timesteps):
        v = torch.randn(x.shape, generator=g)
        index = torch.full((2,), i)
        ours = step_mean(x, v, schedule.gather("coef_x", index, like=x), schedule.gather("coef_eps", index, like=x))
        theirs = reference.step(v, t, x).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        assert float(schedule.std[i]) == 0.0
        x = theirs


def test_sde_schedule_equals_an_independent_flow_grpo_step():
    """noise level a: mean and std of each step written out as Flow-GRPO's sde_step_with_logprob computes them."""
    a, K = 0.7, 6
    schedule = wrap().make_schedule("flow_sde", K, noise_level=a)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(K)
    sigmas = reference.sigmas.double()
    assert float(sigmas[0]) == 1.0  # SD3's schedule starts at σ = 1, where g uses the second sigma
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    for i in range(K):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        dt = sigma_next - sigma
        std_dev_t = math.sqrt(sigma / (1 - (sigma if sigma < 1 else float(sigmas[1])))) * a
        mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        ours = float(schedule.coef_x[i]) * x + float(schedule.coef_eps[i]) * v
        torch.testing.assert_close(ours, mean, rtol=1e-10, atol=1e-10)
        assert float(schedule.std[i]) == pytest.approx(std_dev_t * math.sqrt(-dt), rel=1e-10)
        assert float(schedule.std[i]) > 0
    assert float(schedule.std[0]) == pytest.approx(float(flow_sde_noise_scale(torch.tensor(1.0), a, float(sigmas[1]))) * math.sqrt(1 - float(sigmas[1])))


def test_flow_noise_level_gives_x0_gamma_and_the_forward_process():
    """x̂_0 = x − σ v (velocity_to_x0), ∂x̂_0/∂x = 1, γ = (1 − σ)² / (1 − σ), the VP-equivalent ᾱ; the training forward process
    equals FlowMatchEulerDiscreteScheduler.scale_noise with the velocity target ε − x_0."""
    schedule = wrap().make_schedule("auto", 5)
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    index = torch.arange(5)
    level = schedule.level(index, like=x)
    sigma = schedule.noise[:5].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(predict_x0(x, v, level), velocity_to_x0(x, v, sigma), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(level.x0_jacobian(), torch.ones_like(sigma))
    torch.testing.assert_close(level.gamma("squared"), (1 - sigma) ** 2)
    torch.testing.assert_close(level.gamma("sqrt"), 1 - sigma)
    torch.testing.assert_close(level.alpha_bar, (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2))
    final = schedule.level(torch.tensor([5]), like=x[:1])  # the sample: σ = 0, x̂_0 = x, γ = 1
    assert float(final.noise) == 0 and float(final.gamma()) == 1 and torch.equal(final.predict_x0(x[:1], v[:1]), x[:1])
    # a VP level is the older ᾱ convention
    ab = torch.tensor([0.3, 0.8]).view(2, 1, 1, 1)
    torch.testing.assert_close(NoiseLevel.from_alpha_bar(ab).predict_x0(x[:2], v[:2]), (x[:2] - (1 - ab).sqrt() * v[:2]) / ab.sqrt())

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fp = ForwardProcess.from_scheduler(scheduler)
    t = torch.tensor([0, 250, 999])
    clean, noise = x[:3], v[:3]
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0).scale_noise(clean, fp.model_timesteps[t], noise)
    torch.testing.assert_close(fp.add_noise(clean, noise, t), theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fp.target(clean, noise, t), noise - clean)
    assert fp.prediction_type == "flow" and float(fp.model_timesteps[0]) == 1000.0


# ---------------------------------------------------------------------------------------------------- family against diffusers
def test_prompt_conditioning_decode_and_ode_sampling_equal_stable_diffusion_3_pipeline():
    pipe = tiny_stable_diffusion_3()
    wrapper = DiffusionPipelineForRL(pipe, height=H, width=W)
    assert isinstance(wrapper.family, StableDiffusion3Family) and wrapper.denoiser is pipe.transformer and wrapper.unet is pipe.transformer
    assert wrapper.latent_shape == (4, 8, 16) and wrapper.image_size == (H, W) and wrapper.prompt_embed_dim == 32
    cond = wrapper.encode_prompts(PROMPTS)
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device=torch.device("cpu"), do_classifier_free_guidance=True,
                                                      max_sequence_length=12)
    assert emb.shape == (2, 24, 32) and pooled.shape == (2, 32)  # 12 CLIP + 12 T5 tokens; two pooled CLIP projections
    # (diffusers batches the branches differently: equal to float32 rounding)
    torch.testing.assert_close(cond.embeds, emb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond.added["pooled_projections"], pooled, rtol=1e-6, atol=1e-6)
    negative = wrapper.encode_negative_prompt(None, 2)
    torch.testing.assert_close(negative.embeds, neg, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(negative.added["pooled_projections"], neg_pooled, rtol=1e-6, atol=1e-6)

    # decode: latents / scaling_factor + shift_factor through the VAE
    z = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(3))
    vae = pipe.vae
    assert vae.config.shift_factor == pytest.approx(0.0609)
    with torch.no_grad():
        expected = (vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(wrapper.decode(z), expected, rtol=1e-6, atol=1e-6)
        # encode_images inverts it (posterior mean): (mean − shift) · scaling
        pixels = expected * 2 - 1
        mean = vae.encode(pixels).latent_dist.mean
        torch.testing.assert_close(wrapper.encode_images(pixels, posterior_mean=True), (mean - vae.config.shift_factor) * vae.config.scaling_factor)

    # the deterministic sampler is StableDiffusion3Pipeline.__call__ (same start, CFG, Euler steps)
    schedule = wrapper.make_schedule("auto", 4, noise_level=0.0)
    traj = wrapper.sample(PROMPTS, schedule, guidance_scale=3.0, generators=generators(2, 0), decode=False)
    with torch.no_grad():
        out = pipe(PROMPTS, height=H, width=W, num_inference_steps=4, guidance_scale=3.0, latents=traj.latents[:, 0].clone(),
                   max_sequence_length=12, output_type="latent").images
    torch.testing.assert_close(traj.latents[:, -1], out, rtol=1e-4, atol=1e-4)


def test_sd3_resolves_from_a_saved_model_index_and_saves_a_lora_stable_diffusion_3_pipeline_loads(tmp_path):
    tiny_stable_diffusion_3().save_pretrained(tmp_path / "sd3")
    wrapper = DiffusionPipelineForRL.from_pretrained(str(tmp_path / "sd3"), lora_rank=4, height=H, width=W)
    assert isinstance(wrapper.pipeline, StableDiffusion3Pipeline) and wrapper.has_lora and isinstance(wrapper.family, StableDiffusion3Family)
    assert wrapper.pipeline.tokenizer_3("a cat").input_ids == tiny_stable_diffusion_3().tokenizer_3("a cat").input_ids
    names = {n for n, _ in wrapper.denoiser.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0")) and "lora" not in n}
    assert names and all(hasattr(wrapper.denoiser.get_submodule(n), "lora_A") for n in names)
    from safetensors.torch import load_file

    from trl_gfn.testing import randomise_parameters

    randomise_parameters(wrapper.lora_parameters(), seed=1, scale=0.5)
    wrapper.save_lora(tmp_path / "lora")
    keys = list(load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")))
    assert keys and all(k.startswith("transformer.") for k in keys)
    plain = tiny_stable_diffusion_3()
    plain.load_lora_weights(str(tmp_path / "lora"))
    reloaded = DiffusionPipelineForRL(plain, height=H, width=W)
    schedule = wrapper.make_schedule("auto", 3)
    ours = wrapper.sample(PROMPTS, schedule, guidance_scale=3.0, generators=generators(2, 5)).images
    theirs = reloaded.sample(PROMPTS, schedule, guidance_scale=3.0, generators=generators(2, 5)).images
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    with wrapper.reference_mode():
        base = wrapper.sample(PROMPTS, schedule, guidance_scale=3.0, generators=generators(2, 5)).images
    assert (base - ours).abs().max() > 1e-3


def test_sd3_without_t5_encodes_zero_t5_states():
    wrapper = DiffusionPipelineForRL(tiny_stable_diffusion_3(with_t5=False), height=H, width=W)
    cond = wrapper.encode_prompts(PROMPTS)
    assert cond.embeds.shape == (2, 12 + 256, 32) and float(cond.embeds[:, 12:].abs().max()) == 0


# ---------------------------------------------------------------------------------------------------- every trainer
@pytest.mark.parametrize("name", list(SETTINGS))
def test_sd3_trains_reloads_in_diffusers_and_resumes_exactly(tmp_path, name):
    """Reward rise, LoRA reload with StableDiffusion3Pipeline.load_lora_weights, exact resume (tests/family_harness.py), on
    the flow SDE (the ODE for draft_ode)."""
    trainer = HARNESS.check_trains_reloads_and_resumes(tmp_path, name)
    assert trainer.sampler == "flow_sde" and trainer.schedule.prediction_type == "flow"
    assert trainer.schedule.deterministic == (name == "draft_ode")


def test_trainers_wrap_a_plain_sd3_pipeline_and_run_one_update(tmp_path):
    trainer = make(tmp_path, "ddpo", wrapped=False, sample_batch_size=4, save_freq=0)
    assert isinstance(trainer.pipeline.family, StableDiffusion3Family) and trainer.pipeline.latent_shape == (4, 8, 8)
    before = [p.detach().clone() for p in trainer.pipeline.lora_parameters()]
    trainer.train(epochs=1)
    assert trainer.state.global_step == 1
    assert any((p - q).abs().max() > 0 for p, q in zip(trainer.pipeline.lora_parameters(), before))


def test_diffusion_dpo_trains_on_sd3_with_the_flow_matching_target_and_resumes_exactly(tmp_path):
    data = brightness_preferences(8)

    def trainer(run, **kw):
        c = DiffusionDPOConfig(num_epochs=2, train_batch_size=4, logdir=str(tmp_path), run_name=run, save_freq=1, lora_rank=4,
                               lr_warmup_steps=0, train_learning_rate=1e-3, **kw)
        return DiffusionDPOTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion_3(), height=16, width=16), data)

    full = trainer("full")
    assert full.prediction_type == "flow"
    batch_inputs = []
    make_inputs = full.make_pair_inputs
    full.make_pair_inputs = lambda batch, gens: batch_inputs.append(make_inputs(batch, gens)) or batch_inputs[-1]
    full.train()
    assert full.state.global_step == 4
    # the noising and target are flow matching's: x_σ = (1 − σ) x_0 + σ ε, target ε − x_0, transformer timestep 1000·σ
    inputs = batch_inputs[0]
    sigma = (inputs.timesteps.float() / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(inputs.noisy_w, (1 - sigma) * inputs.latents_w + sigma * inputs.noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs.target_l, inputs.noise - inputs.latents_l)
    moved = sum(float(p.detach().abs().sum()) for n, p in full.pipeline.denoiser.named_parameters() if "lora_B" in n)
    assert moved > 0
    resumed = trainer("cut", resume_from=os.path.join(str(tmp_path), "full", "checkpoints", "checkpoint_1"))
    assert resumed.first_epoch == 1
    resumed.train()
    for a, b in zip(full.pipeline.lora_parameters(), resumed.pipeline.lora_parameters()):
        assert torch.equal(a, b)


def test_spin_samples_its_fakes_with_the_flow_sampler_and_trains_on_sd3(tmp_path):
    from trl_gfn import SPINDiffusionConfig, SPINDiffusionTrainer

    data = brightness_preferences(8)
    pipe = DiffusionPipelineForRL(tiny_stable_diffusion_3(), height=16, width=16)
    made = []
    make_schedule = pipe.make_schedule
    pipe.make_schedule = lambda *a, **k: made.append(make_schedule(*a, **k)) or made[-1]
    trainer = SPINDiffusionTrainer(SPINDiffusionConfig(spin_num_iterations=1, spin_epochs_per_iteration=1, sample_num_steps=4, num_epochs=1,
                                                       train_batch_size=4, save_freq=0, lora_rank=4, lr_warmup_steps=0,
                                                       train_learning_rate=1e-3, logdir=str(tmp_path)), pipe, data)
    trainer.train()
    assert trainer.state.global_step == 2 and made and all(s.prediction_type == "flow" and s.noise_level == 0.7 for s in made)
    assert sum(float(p.detach().abs().sum()) for n, p in pipe.denoiser.named_parameters() if "lora_B" in n) > 0


# ---------------------------------------------------------------------------------------------------- refused combinations
@pytest.mark.parametrize("config_class", [NablaGFlowNetConfig, DDPOConfig])
def test_likelihood_trainers_refuse_the_deterministic_ode_at_config_time(config_class):
    with pytest.raises(ValueError, match=r"sample_noise_level: 0 makes the flow sampler the deterministic Euler ODE.*no density"):
        config_class(sample_noise_level=0.0)
    with pytest.raises(ValueError, match=r"sample_noise_level: 0 makes"):
        config_class(sampler="flow_sde", sample_noise_level=0.0)
    assert config_class(sample_noise_level=0.3).sample_noise_level == 0.3


@pytest.mark.parametrize("config_class", [DRaFTConfig, AlignPropConfig, ReFLConfig])
def test_gradient_trainers_accept_the_deterministic_ode(config_class):
    assert config_class(sample_noise_level=0.0).sample_noise_level == 0.0


def test_sampler_settings_that_do_not_fit_the_family_are_refused(tmp_path):
    common = dict(COMMON, logdir=str(tmp_path), sample_num_steps=2, save_freq=0)
    # explicit UNet sampler settings at config time
    with pytest.raises(ValueError, match=r"sample_noise_level: is the flow sampler's noise level and has no effect with sampler='ddpm'"):
        DDPOConfig(sampler="ddpm", sample_noise_level=0.5)
    with pytest.raises(ValueError, match=r"sample_eta: is not used by the `flow_sde` sampler"):
        DDPOConfig(sampler="flow_sde", sample_eta=0.5)
    # against the family, when the trainer is built
    with pytest.raises(ValueError, match=r"sampler: 'ddpm' does not fit this flow-matching \(SD3\) model"):
        DDPOTrainer(DDPOConfig(sampler="ddpm", **common), BrightnessReward(), wrap(), prompt_function=PROMPTS)
    with pytest.raises(ValueError, match=r"sample_eta: is the DDIM eta of the UNet families and has no effect on a flow-matching model"):
        DDPOTrainer(DDPOConfig(sample_eta=0.5, **common), BrightnessReward(), wrap(), prompt_function=PROMPTS)
    with pytest.raises(ValueError, match=r"sampler: 'flow_sde' does not fit this variance-preserving UNet"):
        DDPOTrainer(DDPOConfig(sampler="flow_sde", **common), BrightnessReward(), tiny_stable_diffusion(), prompt_function=PROMPTS)
    with pytest.raises(ValueError, match=r"sample_noise_level: is the flow sampler's noise level and has no effect on a UNet model"):
        DDPOTrainer(DDPOConfig(sample_noise_level=0.5, **common), BrightnessReward(), tiny_stable_diffusion(), prompt_function=PROMPTS)
    # the default config resolves to each family's stochastic sampler
    sd = DDPOTrainer(DDPOConfig(**common), BrightnessReward(), tiny_stable_diffusion(), prompt_function=PROMPTS)
    sd3 = DDPOTrainer(DDPOConfig(**common), BrightnessReward(), wrap(), prompt_function=PROMPTS)
    assert (sd.sampler, sd3.sampler) == ("ddpm", "flow_sde") and sd.schedule.prediction_type == "epsilon"
    assert bool((sd3.schedule.std > 0).all()) and sd3.schedule.noise_level == 0.7


def test_the_sd3_example_config_and_the_cli_load_an_sd3_model_with_its_size(tmp_path):
    """examples/configs/nabla_gfn_sd3_aesthetic.yaml parses with the SD3 Hub id and the flow sampler's settings; the CLI loads a
    local tiny SD3 through model_index.json, with the config's LoRA and the requested size."""
    import yaml

    from trl_gfn.cli import load_pipeline, parse

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs", "nabla_gfn_sd3_aesthetic.yaml")
    args, config, _ = parse(NablaGFlowNetConfig, ["--config", path])
    with open(path, encoding="utf-8") as f:
        expected = yaml.safe_load(f)
    assert args.pretrained_model == expected["pretrained_model"] == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert (args.height, args.width) == (1024, 1024) and config.sampler == "auto" and config.sample_noise_level == 0.7
    assert config.sample_num_steps == 28 and config.mixed_precision == "bf16"

    tiny_stable_diffusion_3().save_pretrained(tmp_path / "sd3")
    args, config, _ = parse(NablaGFlowNetConfig, ["--pretrained_model", str(tmp_path / "sd3"), "--height", "16", "--width", "32",
                                                  "--lora_rank", "4"])
    pipeline = load_pipeline(args, config)
    assert isinstance(pipeline.pipeline, StableDiffusion3Pipeline) and pipeline.image_size == (16, 32) and pipeline.has_lora
    assert config.resolve_sampler(pipeline.family.default_sampler) == "flow_sde"


def test_the_model_card_loads_the_lora_with_the_sd3_pipeline_class(tmp_path):
    trainer = make(tmp_path, "refl", save_freq=0)
    card = trainer.create_model_card(repo_id="me/sd3-lora")
    assert "StableDiffusion3Pipeline.from_pretrained(" in card and "StableDiffusionPipeline.from_pretrained(" not in card


def test_sd3_trains_under_bf16_with_gradient_checkpointing(tmp_path):
    """The memory options on SD3: transformer, VAE and the three text encoders in bfloat16 (pooled projections cast with them),
    LoRA and flow head in float32, the transformer call checkpointed; one finite update."""
    trainer = make(tmp_path, "nabla_gfn", save_freq=0, mixed_precision="bf16", gradient_checkpointing=True, sample_batch_size=4)
    pipe = trainer.pipeline.pipeline
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder_3.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert trainer.modules.checkpointed == frozenset({"unet"}) and trainer.modules.unet is pipe.transformer
    before = [p.detach().clone() for p in trainer.pipeline.lora_parameters()]
    trainer.train(epochs=1)
    assert all(p.dtype == torch.float32 for p in trainer.pipeline.lora_parameters())
    assert any((p - q).abs().max() > 0 for p, q in zip(trainer.pipeline.lora_parameters(), before))
    assert all(torch.isfinite(p).all() for p in trainer.pipeline.lora_parameters())
