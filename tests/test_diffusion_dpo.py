"""DiffusionDPOTrainer: the loss of a batch against a direct computation with diffusers' UNet and scheduler, the implicit
accuracy rising on a separable toy preference, exact resume, logging, the model card, and the config checks."""

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from trl_gfn import DiffusionDPOConfig, DiffusionDPOTrainer, DiffusionPipelineForRL
from trl_gfn.configs.dpo import DEFAULT_BETA
from trl_gfn.testing import brightness_preferences, tiny_stable_diffusion
from trl_gfn.trainers.base import sample_seed
from trl_gfn.trainers.checkpoints import CheckpointError
from trl_gfn.trainers.diffusion_dpo import lr_factor


def config(tmp_path, **overrides):
    kwargs = dict(num_epochs=1, train_batch_size=4, logdir=str(tmp_path), run_name="run", save_freq=0, lora_rank=4, lr_warmup_steps=0,
                  train_learning_rate=1e-3)
    kwargs.update(overrides)
    return DiffusionDPOConfig(**kwargs)


def randomise_lora(pipeline, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipeline.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def direct_loss(trainer, batch, epoch, beta):
    """Diffusion-DPO's loss written with diffusers' own pieces (VAE posterior, scheduler.add_noise / get_velocity, the UNet
    with and without its adapter) and the Salesforce form -logsigmoid(-beta/2 * (model_diff - ref_diff))."""
    pipe = trainer.pipeline
    vae, unet = pipe.vae, pipe.unet
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(sample_seed(trainer.config.seed, epoch, row, 11)) for row in batch.rows]
    latents = []
    for images in (batch.winners, batch.losers):
        dist = vae.encode(images).latent_dist
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in gens])
        latents.append((dist.mean + dist.std * noise) * vae.config.scaling_factor)
    t = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g) for g in gens])
    eps = torch.stack([torch.randn(latents[0].shape[1:], generator=g) for g in gens])
    embeds = pipe.encode_prompts(batch.captions)
    errs = {}
    for side, lat in zip("wl", latents):
        noisy = scheduler.add_noise(lat, eps, t)
        target = eps if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(lat, eps, t)
        errs["policy", side] = F.mse_loss(unet(noisy, t, encoder_hidden_states=embeds).sample, target, reduction="none").mean(dim=[1, 2, 3])
        unet.disable_adapters()
        with torch.no_grad():
            errs["ref", side] = F.mse_loss(unet(noisy, t, encoder_hidden_states=embeds).sample, target, reduction="none").mean(dim=[1, 2, 3])
        unet.enable_adapters()
    model_diff = errs["policy", "w"] - errs["policy", "l"]
    ref_diff = errs["ref", "w"] - errs["ref", "l"]
    inside = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside).mean(), inside


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_batch_loss_and_gradient_equal_a_direct_diffusers_computation(tmp_path, prediction_type):
    c = config(tmp_path, beta=3000.0)
    pipe = DiffusionPipelineForRL(tiny_stable_diffusion(prediction_type=prediction_type))
    trainer = DiffusionDPOTrainer(c, pipe, brightness_preferences(8))
    randomise_lora(pipe)
    idx = [0, 3, 5, 6]
    rows = [trainer.train_pairs.rows[i] for i in idx]
    batch = trainer.train_pairs.load(idx)
    loss, terms = trainer.compute_loss(batch, trainer.pair_generators(rows, epoch=2))
    params = pipe.lora_parameters()
    grads = torch.autograd.grad(loss, params)
    expected, inside = direct_loss(trainer, batch, 2, 3000.0)
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    for g, e in zip(grads, expected_grads):  # float32, batched differently: tolerance relative to the gradient's scale
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3 * float(e.abs().max()))
    assert terms["implicit_acc"].item() == pytest.approx(((inside > 0).float().mean()).item())
    assert inside.abs().max() > 0.05 and inside.std() > 0  # policy != reference: a non-trivial check
    assert all(torch.isfinite(v) for v in terms.values())


def test_winner_and_loser_share_noise_and_timestep(tmp_path):
    trainer = DiffusionDPOTrainer(config(tmp_path), DiffusionPipelineForRL(tiny_stable_diffusion()), brightness_preferences(8))
    idx = [0, 1, 2, 3]
    batch = trainer.train_pairs.load(idx)
    gens = trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], epoch=0)
    inputs = trainer.make_pair_inputs(batch, gens)
    ab = trainer.alphas_cumprod[inputs.timesteps].view(-1, 1, 1, 1)
    for latents, noisy in ((inputs.latents_w, inputs.noisy_w), (inputs.latents_l, inputs.noisy_l)):
        torch.testing.assert_close(noisy, ab.sqrt() * latents + (1 - ab).sqrt() * inputs.noise)
    again = trainer.make_pair_inputs(batch, trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], epoch=0))
    assert torch.equal(again.noise, inputs.noise) and torch.equal(again.timesteps, inputs.timesteps)
    other = trainer.make_pair_inputs(batch, trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], epoch=1))
    assert not torch.equal(other.noise, inputs.noise)  # a new epoch draws new noise
    assert len(set(inputs.timesteps.tolist())) > 1


def test_implicit_accuracy_rises_on_a_separable_toy_preference(tmp_path):
    """Brighter image preferred: on held-out pairs (fixed noise) the implicit accuracy goes from 1/2 to near 1."""
    from trl_gfn.data.digits_preferences import load_pipeline

    caption = ("a handwritten digit",)
    c = config(tmp_path, num_epochs=3, train_batch_size=8, train_learning_rate=3e-3)
    trainer = DiffusionDPOTrainer(c, load_pipeline(), brightness_preferences(32, captions=caption),
                                  eval_dataset=brightness_preferences(48, seed=1, captions=caption))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["implicit_acc"] == 0.5 and before["logit_mean"] == 0.0  # the policy starts as the reference
    assert after["implicit_acc"] >= 0.85, after
    assert after["winner_gap"] < after["loser_gap"]
    assert trainer.last_metrics["eval/implicit_acc"] == pytest.approx(after["implicit_acc"])
    assert trainer.last_metrics["data/train/pairs"] == 32 and trainer.last_metrics["data/eval/pairs"] == 48


@pytest.mark.parametrize("loss_type,extra", [("sigmoid", dict(lr_scheduler="cosine", lr_warmup_steps=2)), ("adaptive", {}),
                                             ("dmpo", dict(winner_preserving_mu=0.9, random_flip=True))])
def test_resume_is_exact(tmp_path, loss_type, extra):
    data = brightness_preferences(24)

    def trainer(run, **kw):
        c = config(tmp_path, loss_type=loss_type, num_epochs=3, save_freq=1, run_name=run, **extra, **kw)
        return DiffusionDPOTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), data)

    full = trainer("full")
    full.train()
    cut = trainer("cut")
    cut.train(epochs=1)
    resumed = trainer("cut", resume_from=os.path.join(str(tmp_path), "cut", "checkpoints", "checkpoint_1"))
    assert resumed.first_epoch == 1 and resumed.state.global_step == 6
    resumed.train()
    for a, b in zip(full.pipeline.lora_parameters(), resumed.pipeline.lora_parameters()):
        assert torch.equal(a, b)
    if loss_type == "adaptive":
        assert os.path.isfile(os.path.join(str(tmp_path), "cut", "checkpoints", "checkpoint_1", "ema_lora.safetensors"))
        for sa, sb in zip(full.ema.shadows, resumed.ema.shadows):
            for x, y in zip(sa, sb):
                assert torch.equal(x, y)
    moved = sum(float(p.detach().abs().sum()) for n, p in full.pipeline.unet.named_parameters() if "lora_B" in n)
    assert moved > 0  # training changed the LoRA


def test_resume_on_other_pairs_is_refused(tmp_path):
    c = config(tmp_path, save_freq=1)
    DiffusionDPOTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), brightness_preferences(8)).train()
    with pytest.raises(CheckpointError, match="other preference pairs"):
        DiffusionDPOTrainer(config(tmp_path, resume_from=os.path.join(str(tmp_path), "run")), DiffusionPipelineForRL(tiny_stable_diffusion()),
                            brightness_preferences(8, seed=5).select(range(7)).add_item(brightness_preferences(8, seed=6)[0]))


@pytest.mark.parametrize("loss_type", ["hinge", "ipo", "see"])
def test_every_loss_type_trains_and_logs(tmp_path, loss_type):
    c = config(tmp_path, loss_type=loss_type, train_gradient_accumulation_steps=2)
    trainer = DiffusionDPOTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), brightness_preferences(16))
    before = [p.detach().clone() for p in trainer.pipeline.lora_parameters()]
    trainer.train()
    m = trainer.last_metrics
    assert trainer.state.global_step == 2  # 16 pairs / (4 x 2 accumulation)
    for key in ("loss", "implicit_acc", "logit_mean", "winner_gap", "loser_gap", "model_mse", "ref_mse", "grad_norm/lora", "lr/lora"):
        assert key in m and m[key] == m[key], key
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.pipeline.lora_parameters()))


def test_sdpo_rescale_is_logged_and_changes_only_the_gradient(tmp_path):
    data = brightness_preferences(8)
    losses = {}
    for mu in (None, 0.9):
        pipe = DiffusionPipelineForRL(tiny_stable_diffusion())
        trainer = DiffusionDPOTrainer(config(tmp_path, winner_preserving_mu=mu, run_name=f"mu{mu}"), pipe, data)
        randomise_lora(pipe)
        idx = [0, 1, 2, 3]
        loss, terms = trainer.compute_loss(trainer.train_pairs.load(idx), trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], 0))
        losses[mu] = (loss, torch.autograd.grad(loss, pipe.lora_parameters()), terms)
    assert torch.equal(losses[None][0], losses[0.9][0])
    assert 0 <= losses[0.9][2]["loser_grad_scale"] <= 1 and "loser_grad_scale" not in losses[None][2]
    assert any(not torch.allclose(a, b) for a, b in zip(losses[None][1], losses[0.9][1]))


def test_model_card_and_saved_config_name_the_method_and_the_data(tmp_path):
    c = config(tmp_path, loss_type="dmpo")
    trainer = DiffusionDPOTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), brightness_preferences(8))
    trainer.train()
    final = os.path.join(str(tmp_path), "run", "final")
    card = open(os.path.join(final, "README.md"), encoding="utf-8").read()
    assert "DMPO" in card and "2507.07510" in card and "2311.12908" in card and "preference pairs" in card and "maximise the reward" not in card
    assert "`a cat`" in card  # a caption trained on
    saved = json.load(open(os.path.join(final, "training_config.json"), encoding="utf-8"))
    assert saved["beta"] == DEFAULT_BETA["dmpo"] and saved["loss_type"] == "dmpo"
    assert os.path.isfile(os.path.join(final, "pytorch_lora_weights.safetensors"))


def test_too_few_pairs_and_missing_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset: 3 usable pair.*train_batch_size 4"):
        DiffusionDPOTrainer(config(tmp_path), DiffusionPipelineForRL(tiny_stable_diffusion()), brightness_preferences(3))
    with pytest.raises(TypeError, match="train_dataset"):
        DiffusionDPOTrainer(config(tmp_path), DiffusionPipelineForRL(tiny_stable_diffusion()), None)


def test_config_checks_and_defaults():
    assert DiffusionDPOConfig().effective_beta == DEFAULT_BETA["sigmoid"]
    assert DiffusionDPOConfig(loss_type="ipo").effective_beta == DEFAULT_BETA["ipo"]
    assert DiffusionDPOConfig(loss_type="ipo", beta=7.0).to_public_dict()["beta"] == 7.0
    assert DiffusionDPOConfig().to_dict()["beta"] is None
    with pytest.raises(ValueError, match="winner_preserving_mu: applies to loss_type"):
        DiffusionDPOConfig(loss_type="hinge", winner_preserving_mu=0.9)
    with pytest.raises(ValueError, match="tie_handling: must be 'drop' with loss_type='adaptive'"):
        DiffusionDPOConfig(loss_type="adaptive", tie_handling="soft")
    with pytest.raises(ValueError, match="beta: must be > 0"):
        DiffusionDPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="dmpo_alpha"):
        DiffusionDPOConfig(loss_type="dmpo", dmpo_alpha=0.5)
    with pytest.raises(ValueError, match="adaptive_ema_decays"):
        DiffusionDPOConfig(loss_type="adaptive", adaptive_ema_decays=[1.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DiffusionDPOConfig(loss_type="sigmoid", see_gamma=3.0, adaptive_margin="linear")
        DiffusionDPOConfig(lr_scheduler="constant", lr_warmup_steps=50)
    messages = [str(w.message) for w in caught]
    assert any("see_gamma has no effect" in m for m in messages) and any("adaptive_margin has no effect" in m for m in messages)
    assert any("lr_warmup_steps has no effect" in m for m in messages)


def test_lr_schedules():
    assert [lr_factor("constant_with_warmup", s, 4, 20) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor("constant", 0, 4, 20) == 1.0
    assert lr_factor("linear", 4, 4, 20) == 1.0 and lr_factor("linear", 12, 4, 20) == pytest.approx(0.5)
    assert lr_factor("cosine", 12, 4, 20) == pytest.approx(0.5) and lr_factor("cosine", 20, 4, 20) == pytest.approx(0.0)


@pytest.mark.parametrize("loss_type,extra", [("adaptive", dict(lr_scheduler="cosine", lr_warmup_steps=2)), ("sigmoid", {})])
def test_save_steps_checkpoints_inside_an_epoch_and_resume_continues_it_exactly(tmp_path, loss_type, extra):
    data = brightness_preferences(24)  # 24 pairs / (4 pairs x 2 accumulation) = 3 updates per epoch

    def trainer(run, **kw):
        c = config(tmp_path, loss_type=loss_type, num_epochs=2, train_gradient_accumulation_steps=2, save_steps=2, num_checkpoint_limit=10,
                   run_name=run, **extra, **kw)
        return DiffusionDPOTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), data)

    full = trainer("full")
    full.train()
    folder = os.path.join(str(tmp_path), "full", "checkpoints")
    # updates 2 and 4 fall inside epochs 0 and 1; update 6 is epoch 1's last: that epoch's checkpoint (save_freq=0)
    assert sorted(os.listdir(folder)) == ["checkpoint_0_step_2", "checkpoint_1_step_4", "checkpoint_2"]
    with open(os.path.join(folder, "checkpoint_0_step_2", "trl_gfn_checkpoint.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert (manifest["epoch"], manifest["global_step"], manifest["epoch_updates"]) == (0, 2, 2)
    for name, epoch, updates in [("checkpoint_0_step_2", 0, 2), ("checkpoint_1_step_4", 1, 1)]:
        resumed = trainer(f"from_{name}", resume_from=os.path.join(folder, name))
        assert (resumed.first_epoch, resumed.state.epoch_updates) == (epoch, updates)
        resumed.train()
        assert resumed.state.global_step == full.state.global_step == 6 and resumed.state.epoch_updates == 0
        for a, b in zip(full.pipeline.lora_parameters(), resumed.pipeline.lora_parameters(), strict=True):
            assert torch.equal(a, b), name
        for k, entry in full.optimizer.state_dict()["state"].items():
            for key, value in entry.items():
                assert torch.equal(resumed.optimizer.state_dict()["state"][k][key], value), (name, k, key)
        if loss_type == "adaptive":
            for sa, sb in zip(full.ema.shadows, resumed.ema.shadows):
                for x, y in zip(sa, sb):
                    assert torch.equal(x, y)
    # the run directory resumes from its newest checkpoint: the epoch boundary after the inside-epoch ones
    assert trainer("full", resume_from=os.path.join(str(tmp_path), "full")).state.global_step == 6


def test_a_checkpoint_inside_an_epoch_needs_the_same_pairs_per_update(tmp_path):
    data = brightness_preferences(24)
    c = config(tmp_path, num_epochs=1, save_steps=1, num_checkpoint_limit=10)
    DiffusionDPOTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), data).train()
    inside = os.path.join(str(tmp_path), "run", "checkpoints", "checkpoint_0_step_3")
    assert os.path.isdir(inside)
    with pytest.raises(CheckpointError, match=r"inside epoch 0, after 3 updates of 1 process\(es\) x train_batch_size 4 x "
                                              r"train_gradient_accumulation_steps 1 pairs; this run has 1 x 2 x 1"):
        DiffusionDPOTrainer(config(tmp_path, train_batch_size=2, resume_from=inside, run_name="other"),
                            DiffusionPipelineForRL(tiny_stable_diffusion()), data)
    with pytest.raises(CheckpointError, match=r"inside epoch 0, whose order of pairs comes from seed 0; this run has seed 7"):
        DiffusionDPOTrainer(config(tmp_path, seed=7, resume_from=inside, run_name="other"), DiffusionPipelineForRL(tiny_stable_diffusion()), data)
    # an epoch boundary of the same run is fine with another batch size
    boundary = os.path.join(str(tmp_path), "run", "checkpoints", "checkpoint_1")
    assert DiffusionDPOTrainer(config(tmp_path, train_batch_size=2, resume_from=boundary, run_name="other"),
                               DiffusionPipelineForRL(tiny_stable_diffusion()), data).state.epoch == 1
