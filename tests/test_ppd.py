"""PPD (personalised preference fine-tuning): the decoupled user attention, the bundled user-embedding provider, one user
reducing to Diffusion-DPO, per-user conditioning after training, saving / loading / resume, and the errors on bad input."""

import os

import numpy as np
import pytest
import torch

from trl_gfn import DiffusionDPOConfig, DiffusionDPOTrainer, DiffusionPipelineForRL, PPDConfig, PPDTrainer
from trl_gfn.assets import BUNDLED_USER_ENCODER
from trl_gfn.models import UserCrossAttention, load_user_embedding_provider
from trl_gfn.testing import (
    brightness_preferences,
    full_and_resumed,
    full_and_resumed_inside_an_epoch,
    randomise_parameters,
    tiny_stable_diffusion,
)

COMMON = dict(num_epochs=1, train_batch_size=4, save_freq=0, lora_rank=4, lr_warmup_steps=0, train_learning_rate=1e-3, beta=3000.0)


def with_users(dataset, users):
    return dataset.remove_columns("user_id").add_column("user_id", list(users))


def test_user_attention_starts_as_identity_and_skips_text_only_calls():
    pipe = DiffusionPipelineForRL(tiny_stable_diffusion())
    unet = pipe.unet
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text = pipe.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=text).sample
        layers = UserCrossAttention.for_unet(unet, embed_dim=6, num_tokens=3, text_length=text.shape[1])
        layers.install(unet)
        tokens = layers(torch.randn(2, 6))
        assert tokens.shape == (2, 3, 16)
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=text).sample, before)  # text only: the reference
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=torch.cat([text, tokens], 1)).sample, before)  # zero W_o
        randomise_parameters(layers.to_out.parameters())
        assert not torch.allclose(unet(x, t, encoder_hidden_states=torch.cat([text, tokens], 1)).sample, before, atol=1e-4)
        zero = torch.zeros_like(tokens)  # zero tokens: no contribution (no biases), the negative branch of CFG
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=torch.cat([text, zero], 1)).sample, before)
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=text).sample, before)
        layers.install(unet)  # idempotent: wraps the original processors, not its own
        UserCrossAttention.uninstall(unet)
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=torch.cat([text, tokens], 1)[:, :text.shape[1]]).sample, before)


def test_bundled_provider_predicts_unseen_users_choices_from_four_pairs():
    """The shipped DigitsUserEncoder: e_u from 4 pairs of a user (the simulated users' digit sets, never seen as such in its
    training) ranks that user's other validation pairs right (measured 0.80-1.00 per user, mean 0.93), and users differ."""
    from trl_gfn.data.digits_preferences import load_digits_preferences
    from trl_gfn.data.personalized import USER_DIGIT_SETS, personalized_preferences
    from trl_gfn.data.preference import PreferencePairs

    provider = load_user_embedding_provider(BUNDLED_USER_ENCODER)
    pairs = PreferencePairs(personalized_preferences(load_digits_preferences("validation")), resolution=16)
    users = pairs.dataset["user_id"]
    accuracies, embeddings = {}, {}
    for u in USER_DIGIT_SETS:
        positions = [i for i, row in enumerate(pairs.rows) if users[row] == u]
        ctx, rest = pairs.load(positions[:4]), pairs.load(positions[4:])
        e = provider(((ctx.winners + 1) / 2)[None], ((ctx.losers + 1) / 2)[None], None)
        margin = provider.utility((rest.winners + 1) / 2, e.expand(len(rest), -1)) - provider.utility((rest.losers + 1) / 2, e.expand(len(rest), -1))
        accuracies[u], embeddings[u] = float((margin > 0).float().mean()), e[0]
    assert min(accuracies.values()) > 0.7 and np.mean(list(accuracies.values())) > 0.85, accuracies  # measured 0.80-1.00, mean 0.93
    assert float(torch.nn.functional.cosine_similarity(embeddings[1], embeddings[4], dim=0)) < 0.9


def test_provider_loader_refuses_missing_weights_and_unknown_classes(tmp_path):
    with pytest.raises(FileNotFoundError, match="ppd_embedding_provider: .* holds no provider"):
        load_user_embedding_provider(str(tmp_path))
    provider = load_user_embedding_provider(BUNDLED_USER_ENCODER)
    provider.save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "provider.json").write_text('{"provider_class": "Nope"}')
    with pytest.raises(ValueError, match="not a registered provider class"):
        load_user_embedding_provider(str(tmp_path / "p"))
    # a path that does not exist is named as such, not sent to the Hub as a repo id
    for missing in ("./my-provider", str(tmp_path / "nonexistent"), "a/b/c"):
        with pytest.raises(FileNotFoundError, match=r"ppd_embedding_provider: .* is neither an existing folder nor a Hub repo id"):
            load_user_embedding_provider(missing)


def test_a_provider_hub_id_that_cannot_be_fetched_names_the_field(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"ppd_embedding_provider: could not get provider\.json of the Hub repo 'me/provider'"):
        load_user_embedding_provider("me/provider")


def test_one_user_reduces_to_diffusion_dpo(tmp_path):
    """With one user the added branch starts at zero: PPD's loss and LoRA gradient equal Diffusion-DPO's (same pairs, noise, LoRA)."""
    data = with_users(brightness_preferences(8), [7] * 8)
    out = {}
    for name, cls, cfg in (("dpo", DiffusionDPOTrainer, DiffusionDPOConfig), ("ppd", PPDTrainer, PPDConfig)):
        pipe = DiffusionPipelineForRL(tiny_stable_diffusion())
        trainer = cls(cfg(logdir=str(tmp_path), run_name=name, **COMMON), pipe, data)
        randomise_parameters(pipe.lora_parameters())
        idx = [0, 2, 5, 7]
        gens = trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], 1)
        loss, terms = trainer.compute_loss(trainer.train_pairs.load(idx), gens)
        out[name] = (loss, torch.autograd.grad(loss, pipe.lora_parameters(), retain_graph=True), terms, trainer)
    torch.testing.assert_close(out["ppd"][0], out["dpo"][0], rtol=1e-6, atol=1e-7)
    assert out["dpo"][0].item() != pytest.approx(np.log(2), abs=1e-3)  # policy != reference: not trivially equal
    for a, b in zip(out["ppd"][1], out["dpo"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    ppd = out["ppd"][3]
    user_grads = torch.autograd.grad(out["ppd"][0], list(ppd.user_layers.to_out.parameters()))
    assert any(float(g.abs().max()) > 0 for g in user_grads)  # the user branch learns from the first step


def test_each_user_needs_enough_pairs_and_a_user_column(tmp_path):
    data = with_users(brightness_preferences(12), [0] * 9 + [2] * 3)
    with pytest.raises(ValueError, match=r"ppd_context_pairs: user 2 of train_dataset has only 3 usable pair\(s\).*ppd_context_pairs=4"):
        PPDTrainer(PPDConfig(logdir=str(tmp_path), run_name="r", **COMMON), DiffusionPipelineForRL(tiny_stable_diffusion()), data)
    PPDTrainer(PPDConfig(logdir=str(tmp_path), run_name="r3", ppd_context_pairs=3, **COMMON), DiffusionPipelineForRL(tiny_stable_diffusion()), data)
    with pytest.raises(ValueError, match="train_dataset: PPD needs a user column"):
        PPDTrainer(PPDConfig(logdir=str(tmp_path), run_name="r", **COMMON), DiffusionPipelineForRL(tiny_stable_diffusion()),
                   brightness_preferences(8).remove_columns("user_id"))
    with pytest.raises(ValueError, match="ppd_context_pairs: must be an integer >= 1"):
        PPDConfig(ppd_context_pairs=0)
    with pytest.raises(ValueError, match="loss_type: 'adaptive' is not supported with PPD"):
        PPDConfig(loss_type="adaptive")
    with pytest.raises(FileNotFoundError, match="ppd_embedding_provider"):
        PPDTrainer(PPDConfig(logdir=str(tmp_path), run_name="r", ppd_embedding_provider=str(tmp_path), **COMMON),
                   DiffusionPipelineForRL(tiny_stable_diffusion()), with_users(brightness_preferences(8), [0] * 8))


def test_conditioning_on_the_user_after_training_on_two_users(tmp_path):
    """Two simulated users with disjoint digit sets on the bundled model: after training, each user's held-out pairs are ranked
    right more often with their own embedding than with the other user's."""
    from trl_gfn.data.digits_preferences import load_digits_preferences, load_pipeline
    from trl_gfn.data.personalized import personalized_preferences
    from trl_gfn.data.preference import PreferencePairs

    users = {0: (0, 6, 8, 9), 1: (1, 4, 7)}
    train = personalized_preferences(load_digits_preferences("train").select(range(400)), users)
    evals = personalized_preferences(load_digits_preferences("validation"), users)
    c = PPDConfig(logdir=str(tmp_path), run_name="two", num_epochs=3, train_batch_size=8, lora_rank=4, lr_warmup_steps=0,
                  train_learning_rate=3e-3, save_freq=0, eval_freq=0)
    trainer = PPDTrainer(c, load_pipeline(), train)
    trainer.train()
    pairs = PreferencePairs(evals, resolution=16, name="eval_dataset")
    owners = pairs.dataset["user_id"]
    own, swapped = {}, {}
    for u in users:
        positions = [i for i, row in enumerate(pairs.rows) if owners[row] == u]
        own[u] = trainer.evaluate(_subset(pairs, positions))["implicit_acc"]
        trainer.user_table[u], trainer.user_table[1 - u] = trainer.user_table[1 - u], trainer.user_table[u]
        swapped[u] = trainer.evaluate(_subset(pairs, positions))["implicit_acc"]
        trainer.user_table[u], trainer.user_table[1 - u] = trainer.user_table[1 - u], trainer.user_table[u]
    assert all(own[u] > swapped[u] + 0.1 for u in users), (own, swapped)
    assert min(own.values()) > 0.7, own


def _subset(pairs, positions):
    import copy

    out = copy.copy(pairs)
    out.rows = [pairs.rows[i] for i in positions]
    out.first_preferred = [pairs.first_preferred[i] for i in positions]
    out.labels = [pairs.labels[i] for i in positions]
    return out


def test_resume_inside_an_epoch_is_exact(tmp_path):
    data = with_users(brightness_preferences(16), [0] * 8 + [1] * 8)

    def trainer(run, **kw):
        c = PPDConfig(logdir=str(tmp_path), run_name=run, **dict(COMMON, num_epochs=2, save_freq=0, **kw))
        return PPDTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), data)

    full, resumed = full_and_resumed_inside_an_epoch(trainer, tmp_path)
    assert resumed.state.global_step == full.state.global_step
    for a, b in zip(list(full.pipeline.lora_parameters()) + list(full.user_layers.parameters()),
                    list(resumed.pipeline.lora_parameters()) + list(resumed.user_layers.parameters()), strict=True):
        assert torch.equal(a, b)


def test_final_folder_resume_and_interpolated_sampling(tmp_path):
    data = with_users(brightness_preferences(16), [0] * 8 + [1] * 8)

    def trainer(run, **kw):
        c = PPDConfig(logdir=str(tmp_path), run_name=run, **dict(COMMON, num_epochs=2, save_freq=1, **kw))
        return PPDTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), data)

    full, resumed = full_and_resumed(trainer, tmp_path, 1)
    for a, b in zip(list(full.pipeline.lora_parameters()) + list(full.user_layers.parameters()),
                    list(resumed.pipeline.lora_parameters()) + list(resumed.user_layers.parameters())):
        assert torch.equal(a, b)
    final = os.path.join(str(tmp_path), "full", "final")
    for f in full.final_files():
        assert os.path.isfile(os.path.join(final, f)), f
    from safetensors.torch import load_file

    table = load_file(os.path.join(final, "user_embeddings.safetensors"))
    assert sorted(table) == ["0", "1"] and torch.equal(table["1"], full.user_embedding(1))
    loaded = UserCrossAttention.from_pretrained(os.path.join(final, "user_attention"))
    for a, b in zip(loaded.parameters(), full.user_layers.parameters()):
        assert torch.equal(a, b)
    assert load_user_embedding_provider(os.path.join(final, "user_embedding_provider")).embed_dim == full.provider.embed_dim
    assert "PPD" in open(os.path.join(final, "README.md"), encoding="utf-8").read()
    # inference: a user, another, and their midpoint; alpha = 0 is user 0 exactly
    pipe, schedule = full.pipeline, full.pipeline.make_schedule("ddpm", 3, 1.0)
    e0, e1 = full.user_embedding(0), full.user_embedding(1)

    def sample(e):
        tokens = full.user_tokens(e[None])
        return pipe.sample(["a cat"], schedule, guidance_scale=2.0, generators=[torch.Generator().manual_seed(0)], extra_tokens=tokens).images

    a, b, mid, same = sample(e0), sample(e1), sample(0.5 * e0 + 0.5 * e1), sample(1.0 * e0 + 0.0 * e1)
    torch.testing.assert_close(same, a)
    assert not torch.allclose(a, b) and not torch.allclose(mid, a)
    with pytest.raises(ValueError, match="extra_tokens: expected shape"):
        pipe.sample(["a cat"], schedule, guidance_scale=2.0, extra_tokens=torch.zeros(1, 2, 5))


def test_push_to_hub_uploads_lora_user_layers_provider_and_embeddings(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))

    def fake_commit(self, repo_id, operations, commit_message, **kw):
        calls["files"] = sorted(op.path_in_repo for op in operations)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_commit)
    trainer = PPDTrainer(PPDConfig(logdir=str(tmp_path), run_name="hub", **COMMON), DiffusionPipelineForRL(tiny_stable_diffusion()),
                         with_users(brightness_preferences(8), [0] * 4 + [1] * 4))
    trainer.train()
    trainer.push_to_hub("me/tiny-ppd")
    assert calls["repo"] == "me/tiny-ppd"
    assert calls["files"] == sorted(["pytorch_lora_weights.safetensors", "README.md", "training_config.json", "user_attention/config.json",
                                     "user_attention/diffusion_pytorch_model.safetensors", "user_embeddings.safetensors",
                                     "user_embedding_provider/provider.json", "user_embedding_provider/model.safetensors",
                                     "user_embedding_provider/config.json"])


def test_the_model_card_shows_how_to_load_the_user_layers_and_its_code_runs(tmp_path):
    import re

    data = with_users(brightness_preferences(8), [0] * 4 + [1] * 4)
    c = PPDConfig(logdir=str(tmp_path), run_name="card", **dict(COMMON, num_epochs=1, save_freq=0))
    trainer = PPDTrainer(c, DiffusionPipelineForRL(tiny_stable_diffusion()), data)
    trainer.train()
    final = trainer.save_pretrained()
    card = trainer.create_model_card("me/ppd-lora")
    extra = card.split("The LoRA alone does not personalise")[1]
    code = re.search(r"```python\n(.*?)```", extra, re.S).group(1)
    assert 'snapshot_download("me/ppd-lora")' in code and "user_attention" in code and "user_embeddings.safetensors" in code
    pipeline = tiny_stable_diffusion()
    pipeline.load_lora_weights(final)
    namespace = {"pipeline": pipeline}
    exec(code.replace('snapshot_download("me/ppd-lora")', repr(final)).replace("make_schedule(\"auto\", 30)", "make_schedule(\"auto\", 3)"), namespace)
    assert namespace["images"].shape[0] == 1 and torch.isfinite(namespace["images"]).all()


def test_random_flip_trains_and_leaves_the_user_context_pairs_unflipped(tmp_path):
    data = with_users(brightness_preferences(8), [0] * 4 + [1] * 4)
    flipped = PPDTrainer(PPDConfig(logdir=str(tmp_path), run_name="flip", random_flip=True, **COMMON), DiffusionPipelineForRL(tiny_stable_diffusion()), data)
    plain = PPDTrainer(PPDConfig(logdir=str(tmp_path), run_name="plain", **COMMON), DiffusionPipelineForRL(tiny_stable_diffusion()), data)
    for user in (0, 1):  # the embeddings come from the pairs as stored
        torch.testing.assert_close(flipped.user_embedding(user), plain.user_embedding(user), rtol=0, atol=0)
    flipped.train()
    assert flipped.state.global_step == 2


def test_the_preference_configs_say_vae_gradient_checkpointing_is_ignored():
    from trl_gfn import InversionDPOConfig, SPINDiffusionConfig

    for config_class in (DiffusionDPOConfig, InversionDPOConfig, SPINDiffusionConfig, PPDConfig):
        with pytest.warns(UserWarning, match="vae_gradient_checkpointing"):
            config_class(vae_gradient_checkpointing=True)
