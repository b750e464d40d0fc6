"""SPIN-Diffusion (self-play on the preferred images) and its SFT-on-winners baseline: the loss against a direct computation,
the reference moving forward each iteration through a second LoRA adapter, the fakes, exact resume, and the config checks."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from trl_gfn import DiffusionDPOConfig, DiffusionDPOTrainer, DiffusionPipelineForRL, SPINDiffusionConfig, SPINDiffusionTrainer
from trl_gfn.data.self_play import SelfPlayBatch
from trl_gfn.testing import brightness_preferences, encode_png, full_and_resumed, randomise_parameters, tiny_stable_diffusion
from trl_gfn.trainers.base import sample_seed
from trl_gfn.trainers.spin import REFERENCE_ADAPTER


def config(tmp_path, **overrides):
    kwargs = dict(num_epochs=2, spin_num_iterations=2, spin_epochs_per_iteration=1, train_batch_size=4, logdir=str(tmp_path), run_name="run",
                  save_freq=0, lora_rank=4, lr_warmup_steps=0, train_learning_rate=3e-3, sample_num_steps=3, sample_batch_size=8, beta=3000.0)
    kwargs.update(overrides)
    return SPINDiffusionConfig(**kwargs)


def adapter(pipe, name):
    return [p.detach().clone() for p in pipe.adapter_parameters(name)]


def test_reference_moves_forward_each_iteration_by_switching_adapters(tmp_path):
    pipe = DiffusionPipelineForRL(tiny_stable_diffusion())
    trainer = SPINDiffusionTrainer(config(tmp_path, num_epochs=3, spin_num_iterations=3), pipe, brightness_preferences(8))
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    lora = sum(p.numel() for p in pipe.lora_parameters())
    assert n_params - 2 * lora == sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" not in n)  # two LoRAs, one UNet
    seen = []
    original = trainer.advance_reference

    def spy():
        before = adapter(pipe, pipe.adapter_name)
        original()
        seen.append((before, adapter(pipe, REFERENCE_ADAPTER)))

    trainer.advance_reference = spy
    trainer.train()
    assert len(seen) == 3  # once per iteration
    for k, (policy, reference) in enumerate(seen):
        assert all(torch.equal(a, b) for a, b in zip(policy, reference)), k  # reference := the LoRA at the iteration's start
        if k:
            assert any(not torch.equal(a, b) for a, b in zip(seen[k - 1][1], reference)), k  # ... which moved
    assert any(not torch.equal(a, b) for a, b in zip(adapter(pipe, pipe.adapter_name), seen[-1][1]))  # the last iteration trained
    assert all(p.requires_grad for p in pipe.lora_parameters()) and not any(p.requires_grad for p in pipe.adapter_parameters(REFERENCE_ADAPTER))
    assert trainer.last_metrics["spin/iteration"] == 2.0


def direct_loss(trainer, batch, epoch, beta):
    """SPIN's per-step logistic loss from diffusers' pieces: real image through the VAE (posterior sample), the fake latent as
    given, scheduler.add_noise with a shared t and ε, the UNet with the trained adapter (policy) and with the reference adapter."""
    pipe = trainer.pipeline
    vae, unet = pipe.vae, pipe.unet
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(sample_seed(trainer.config.seed, epoch, row, 11)) for row in batch.rows]
    dist = vae.encode(batch.winners).latent_dist
    real = (dist.mean + dist.std * torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in gens])) * vae.config.scaling_factor
    t = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g) for g in gens])
    eps = torch.stack([torch.randn(real.shape[1:], generator=g) for g in gens])
    emb = pipe.encode_prompts(batch.captions)
    errs = {}
    for side, lat in (("w", real), ("l", batch.fake_latents)):
        noisy = scheduler.add_noise(lat, eps, t)
        errs["policy", side] = F.mse_loss(unet(noisy, t, encoder_hidden_states=emb).sample, eps, reduction="none").mean(dim=[1, 2, 3])
        unet.set_adapter(REFERENCE_ADAPTER)
        with torch.no_grad():
            errs["ref", side] = F.mse_loss(unet(noisy, t, encoder_hidden_states=emb).sample, eps, reduction="none").mean(dim=[1, 2, 3])
        unet.set_adapter(pipe.adapter_name)
    inside = -0.5 * beta * ((errs["policy", "w"] - errs["ref", "w"]) - (errs["policy", "l"] - errs["ref", "l"]))
    return -F.logsigmoid(inside).mean(), inside


def test_loss_and_gradient_equal_a_direct_computation(tmp_path):
    pipe = DiffusionPipelineForRL(tiny_stable_diffusion())
    trainer = SPINDiffusionTrainer(config(tmp_path, spin_samples_per_prompt=2), pipe, brightness_preferences(8))
    trainer.train_pairs.fakes = trainer.sample_fakes(0)
    assert trainer.train_pairs.fakes.shape == (16, *pipe.latent_shape) and len(trainer.train_pairs) == 16
    randomise_parameters(pipe.lora_parameters(), 0)
    randomise_parameters(pipe.adapter_parameters(REFERENCE_ADAPTER), 1)
    idx = [0, 3, 5, 6]
    batch = trainer.train_pairs.load(idx, trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], 2))
    assert isinstance(batch, SelfPlayBatch) and torch.equal(batch.fake_latents, trainer.train_pairs.fakes[idx])
    loss, terms = trainer.compute_loss(batch, trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], 2))
    grads = torch.autograd.grad(loss, pipe.lora_parameters())
    expected, inside = direct_loss(trainer, batch, 2, 3000.0)
    expected_grads = torch.autograd.grad(expected, pipe.lora_parameters())
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3 * float(e.abs().max()))
    assert inside.abs().max() > 0.05 and terms["implicit_acc"].item() == pytest.approx((inside > 0).float().mean().item())


def test_fakes_are_reference_samples_of_the_same_caption(tmp_path):
    pipe = DiffusionPipelineForRL(tiny_stable_diffusion())
    data = brightness_preferences(8)  # captions alternate "a cat" / "a dog"
    trainer = SPINDiffusionTrainer(config(tmp_path, spin_samples_per_prompt=2, sample_batch_size=3), pipe, data)
    randomise_parameters(pipe.adapter_parameters(REFERENCE_ADAPTER), 1)
    fakes = trainer.sample_fakes(1)
    i = 5  # kept pair 2 (a cat), fake 1
    row = trainer.train_pairs.rows[i]
    schedule = pipe.make_schedule("ddpm", 3, 1.0)
    with pipe.adapter_mode(REFERENCE_ADAPTER):
        ref = pipe.sample([data[2]["caption"]], schedule, guidance_scale=3.0,
                          generators=[torch.Generator().manual_seed(sample_seed(0, 1, row, 17))], decode=False).latents[:, -1]
    policy = pipe.sample([data[2]["caption"]], schedule, guidance_scale=3.0,
                         generators=[torch.Generator().manual_seed(sample_seed(0, 1, row, 17))], decode=False).latents[:, -1]
    torch.testing.assert_close(fakes[i], ref[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fakes[i], policy[0], atol=1e-3)  # drawn with the reference adapter, not the trained one
    assert not torch.equal(fakes[4], fakes[5]) and not torch.equal(trainer.sample_fakes(2)[5], fakes[5])


def test_resume_across_an_iteration_is_exact(tmp_path):
    data = brightness_preferences(8)

    def trainer(run, **kw):
        c = config(tmp_path, num_epochs=3, spin_num_iterations=3, save_freq=1, run_name=run, **kw)
        return SPINDiffusionTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), data)

    full, resumed = full_and_resumed(trainer, tmp_path, 2)
    assert os.path.isfile(os.path.join(str(tmp_path), "cut", "checkpoints", "checkpoint_2", "spin_reference_lora.safetensors"))
    for a, b in zip(full.pipeline.lora_parameters(), resumed.pipeline.lora_parameters()):
        assert torch.equal(a, b)
    for a, b in zip(adapter(full.pipeline, REFERENCE_ADAPTER), adapter(resumed.pipeline, REFERENCE_ADAPTER)):
        assert torch.equal(a, b)
    card = open(os.path.join(str(tmp_path), "full", "final", "README.md"), encoding="utf-8").read()
    assert "SPIN-Diffusion" in card and "2402.10210" in card


def test_resume_inside_an_iteration_restores_the_reference_and_the_fakes(tmp_path):
    data = brightness_preferences(8)

    def trainer(run, **kw):
        c = config(tmp_path, num_epochs=2, spin_num_iterations=1, spin_epochs_per_iteration=2, save_freq=1, run_name=run, **kw)
        return SPINDiffusionTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), data)

    full, resumed = full_and_resumed(trainer, tmp_path, 1)
    assert torch.equal(full.train_pairs.fakes, resumed.train_pairs.fakes)
    for a, b in zip(full.pipeline.lora_parameters(), resumed.pipeline.lora_parameters()):
        assert torch.equal(a, b)


def test_config_checks():
    with pytest.raises(ValueError, match=r"num_epochs: SPIN-Diffusion trains .* = 3 x 2 = 6 epochs; got num_epochs=2"):
        SPINDiffusionConfig(spin_num_iterations=3, spin_epochs_per_iteration=2, num_epochs=2)
    with pytest.raises(ValueError, match="spin_samples_per_prompt: must be an integer >= 1"):
        SPINDiffusionConfig(spin_samples_per_prompt=0)
    with pytest.raises(ValueError, match="spin_num_iterations: must be an integer >= 1"):
        SPINDiffusionConfig(spin_num_iterations=0)
    with pytest.raises(ValueError, match="loss_type: 'sft' is not a self-play loss"):
        SPINDiffusionConfig(loss_type="sft")
    with pytest.raises(ValueError, match="tie_handling: must be 'drop' for SPIN-Diffusion"):
        SPINDiffusionConfig(tie_handling="soft")
    with pytest.raises(ValueError, match="sample_eta"):
        SPINDiffusionConfig(sample_eta=0.0)


# ------------------------------------------------------------------------------------------------ the SFT baseline
def test_sft_loss_is_the_winners_denoising_error_and_ignores_the_loser(tmp_path):
    data = brightness_preferences(8)
    black = encode_png(np.zeros((16, 16, 3), dtype=np.uint8))
    swapped = data.map(lambda r: {"jpg_1": black if r["label_0"] == 1.0 else r["jpg_1"], "jpg_0": black if r["label_0"] == 0.0 else r["jpg_0"]})
    results = []
    for ds in (data, swapped):  # same winners, other losers
        pipe = DiffusionPipelineForRL(tiny_stable_diffusion())
        c = DiffusionDPOConfig(loss_type="sft", num_epochs=1, train_batch_size=4, logdir=str(tmp_path), run_name="sft", save_freq=0, lora_rank=4)
        trainer = DiffusionDPOTrainer(c, pipe, ds)
        randomise_parameters(pipe.lora_parameters())
        idx = [0, 1, 2, 3]
        gens = trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], 0)
        batch = trainer.train_pairs.load(idx)
        loss, terms = trainer.compute_loss(batch, gens)
        inputs = trainer.make_pair_inputs(batch, trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], 0))
        with torch.no_grad():
            expected = trainer.denoise(pipe.unet, inputs).err_w.mean()
        torch.testing.assert_close(loss.detach(), expected)
        results.append((loss.detach(), torch.autograd.grad(loss, pipe.lora_parameters())))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.warns(UserWarning, match="beta has no effect"):
        DiffusionDPOConfig(loss_type="sft", beta=10.0)


def test_benchmark_methods_of_the_new_trainers_build_their_configs():
    from trl_gfn import InversionDPOConfig
    from trl_gfn.evaluation.preference_benchmark import TRAINERS, PreferenceBenchmarkSettings, method_config

    s = PreferenceBenchmarkSettings()
    spin = method_config("spin", 0, s)
    assert isinstance(spin, SPINDiffusionConfig) and spin.spin_num_iterations == s.epochs == spin.num_epochs
    assert method_config("sft", 0, s).loss_type == "sft" and type(method_config("sft", 0, s)) is DiffusionDPOConfig
    inv = method_config("inversion_dpo_released_sign", 1, s)
    assert isinstance(inv, InversionDPOConfig) and inv.inversion_sign == "released" and inv.seed == 1
    assert set(TRAINERS) == {"inversion_dpo", "inversion_dpo_released_sign", "spin"}


def test_resume_inside_the_first_epoch_of_an_iteration_keeps_its_reference(tmp_path):
    """A checkpoint inside an epoch that began an iteration: the reference was moved forward when the epoch began, so the
    resumed run restores it and must not move it again (it would copy the half-trained LoRA into it)."""
    data = brightness_preferences(8)

    def trainer(run, **kw):
        return SPINDiffusionTrainer(config(tmp_path, save_steps=1, num_checkpoint_limit=20, run_name=run, **kw),
                                    DiffusionPipelineForRL(tiny_stable_diffusion()), data)

    full = trainer("full")
    full.train()
    folder = os.path.join(str(tmp_path), "full", "checkpoints")
    inside = sorted(n for n in os.listdir(folder) if n.startswith("checkpoint_1_step_"))
    assert inside, os.listdir(folder)
    resumed = trainer("resumed", resume_from=os.path.join(folder, inside[0]))
    assert resumed.first_epoch == 1 and resumed.state.epoch_updates >= 1
    resumed.train()
    for a, b in zip(full.pipeline.lora_parameters(), resumed.pipeline.lora_parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(adapter(full.pipeline, REFERENCE_ADAPTER), adapter(resumed.pipeline, REFERENCE_ADAPTER), strict=True):
        assert torch.equal(a, b)
