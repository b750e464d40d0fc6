"""PPD on SD3: the decoupled user attention on the transformer's joint attention layers (identity at the start, the image
tokens changed and the context tokens not, the branch against a hand-written attention, gradients), the user tokens' route
beside the prompt (joint_attention_kwargs), one user reducing to Diffusion-DPO, training, the final folder reloading in
diffusers and exact resume."""

import os

import numpy as np
import pytest
import torch

from trl_gfn import DiffusionDPOConfig, DiffusionDPOTrainer, DiffusionPipelineForRL, PPDConfig, PPDTrainer
from trl_gfn.models import UserCrossAttention
from trl_gfn.models.user_attention import JointUserAttnProcessor, joint_attention_layers
from trl_gfn.pipelines import EXTRA_TOKENS
from trl_gfn.testing import brightness_preferences, full_and_resumed, randomise_parameters, tiny_stable_diffusion_3

SIZE = 16
COMMON = dict(num_epochs=1, train_batch_size=4, save_freq=0, lora_rank=4, lr_warmup_steps=0, train_learning_rate=1e-3, beta=3000.0)


def wrap(seed=0):
    return DiffusionPipelineForRL(tiny_stable_diffusion_3(seed=seed), height=SIZE, width=SIZE)


def with_users(dataset, users):
    return dataset.remove_columns("user_id").add_column("user_id", list(users))


def inputs(pipe, n=2):
    g = torch.Generator().manual_seed(0)
    cond = pipe.encode_prompts(["a cat", "a dog"][:n])
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([900.0, 300.0])[:n], cond


# ------------------------------------------------------------------------------------------------ the joint user attention
def test_joint_user_attention_starts_as_identity_and_changes_image_tokens_only():
    pipe = wrap()
    transformer = pipe.denoiser
    x, t, cond = inputs(pipe)
    with torch.no_grad():
        before = pipe.model_output(transformer, x, t, cond)
        layers = UserCrossAttention.for_denoiser(transformer, embed_dim=6, num_tokens=3, text_length=12)
        assert layers.config.layer_kind == "joint_attention" and len(layers.to_k) == len(transformer.transformer_blocks) == 2
        layers.install(transformer)
        assert all(isinstance(m.processor, JointUserAttnProcessor) for _, m in joint_attention_layers(transformer))
        tokens = layers(torch.randn(2, 6, generator=torch.Generator().manual_seed(1)))
        assert tokens.shape == (2, 3, pipe.extra_token_dim) and pipe.extra_token_dim == 16  # the context stream's width
        with_user = pipe.append_extra_tokens(cond, tokens)
        assert torch.equal(with_user.embeds, cond.embeds) and torch.equal(with_user.added[EXTRA_TOKENS], tokens)  # beside, not appended
        torch.testing.assert_close(pipe.model_output(transformer, x, t, cond), before, rtol=0, atol=0)  # no tokens: the reference
        torch.testing.assert_close(pipe.model_output(transformer, x, t, with_user), before, rtol=0, atol=0)  # zero W_o
        randomise_parameters(layers.to_out.parameters(), scale=0.5)
        after = pipe.model_output(transformer, x, t, with_user)
        assert (after - before).abs().max() > 1e-3
        # the family's route is the transformer's joint_attention_kwargs
        direct = transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds, pooled_projections=cond.added["pooled_projections"],
                             joint_attention_kwargs={EXTRA_TOKENS: tokens}).sample
        torch.testing.assert_close(after, direct, rtol=0, atol=0)
        zero = pipe.append_extra_tokens(cond, torch.zeros_like(tokens))  # zero tokens add nothing (no biases): CFG's negative branch
        torch.testing.assert_close(pipe.model_output(transformer, x, t, zero), before, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pipe.model_output(transformer, x, t, cond), before, rtol=0, atol=0)

        # one layer: image output = base + W_o·softmax(q kᵀ/√d) v (written out), the context output unchanged
        attn = transformer.transformer_blocks[0].attn
        h, c = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(2)), torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(3))
        base_img, base_ctx = attn.processor.base(attn, h, c)
        img, ctx = attn(hidden_states=h, encoder_hidden_states=c, **{EXTRA_TOKENS: tokens})
        torch.testing.assert_close(ctx, base_ctx, rtol=0, atol=0)
        q = attn.to_q(h).view(2, 64, 2, 8).transpose(1, 2)
        k, v = (f(tokens).view(2, 3, 2, 8).transpose(1, 2) for f in (layers.to_k[0], layers.to_v[0]))
        weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
        branch = layers.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 64, 16))
        torch.testing.assert_close(img, base_img + branch, rtol=1e-5, atol=1e-6)
        assert branch.abs().max() > 1e-3

        layers.install(transformer)  # idempotent: wraps the original processors, not its own
        assert not isinstance(transformer.transformer_blocks[0].attn.processor.base, JointUserAttnProcessor)
        UserCrossAttention.uninstall(transformer)
        assert not any(isinstance(m.processor, JointUserAttnProcessor) for _, m in joint_attention_layers(transformer))
    with pytest.raises(ValueError, match=r"extra_tokens: expected shape \(2, T, 16\)"):
        pipe.append_extra_tokens(cond, torch.zeros(2, 3, 32))


def test_gradients_reach_the_added_layers_through_the_transformer():
    pipe = wrap()
    x, t, cond = inputs(pipe)
    layers = UserCrossAttention.for_transformer(pipe.denoiser, embed_dim=6, num_tokens=3)
    layers.install(pipe.denoiser)
    e = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))

    def grads():
        out = pipe.model_output(pipe.denoiser, x, t, pipe.append_extra_tokens(cond, layers(e)))
        return torch.autograd.grad(out.pow(2).sum(), list(layers.parameters()), allow_unused=True)

    names = [n for n, _ in layers.named_parameters()]
    first = dict(zip(names, grads()))
    assert all(float(first[f"to_out.{i}.weight"].abs().max()) > 0 for i in range(2))  # W_o = 0 learns from the first step
    randomise_parameters(layers.to_out.parameters(), scale=0.5)
    later = dict(zip(names, grads()))
    assert all(g is not None and float(g.abs().max()) > 0 for g in later.values()), [n for n, g in later.items() if g is None or not g.abs().max()]


# ------------------------------------------------------------------------------------------------ the trainer
def test_one_user_reduces_to_diffusion_dpo_on_sd3(tmp_path):
    data = with_users(brightness_preferences(8), [7] * 8)
    out = {}
    for name, cls, cfg in (("dpo", DiffusionDPOTrainer, DiffusionDPOConfig), ("ppd", PPDTrainer, PPDConfig)):
        pipe = wrap()
        trainer = cls(cfg(logdir=str(tmp_path), run_name=name, **COMMON), pipe, data)
        randomise_parameters(pipe.lora_parameters(), scale=0.2)
        idx = [0, 2, 5, 7]
        gens = trainer.pair_generators([trainer.train_pairs.rows[i] for i in idx], 1)
        loss, _ = trainer.compute_loss(trainer.train_pairs.load(idx), gens)
        out[name] = (loss, torch.autograd.grad(loss, pipe.lora_parameters(), retain_graph=True), trainer)
    torch.testing.assert_close(out["ppd"][0], out["dpo"][0], rtol=1e-6, atol=1e-7)
    assert out["dpo"][0].item() != pytest.approx(np.log(2), abs=1e-3)  # policy != reference: not trivially equal
    for a, b in zip(out["ppd"][1], out["dpo"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    ppd = out["ppd"][2]
    assert ppd.user_layers.config.layer_kind == "joint_attention"
    user_grads = torch.autograd.grad(out["ppd"][0], list(ppd.user_layers.to_out.parameters()))
    assert any(float(g.abs().max()) > 0 for g in user_grads)


def opposite_users(n=8):
    """The same n toy pairs twice: user 0 prefers the brighter image, user 1 the darker one."""
    import datasets

    base = brightness_preferences(n)
    flipped = base.map(lambda row: {"label_0": 1.0 - row["label_0"]})
    return with_users(datasets.concatenate_datasets([base, flipped]), [0] * n + [1] * n)


def fit_one_batch(cls, config_class, tmp_path, steps=20, lr=3e-3):
    """Adam steps on one batch of both users' pairs with the same timestep and noise for a pair and its flipped copy (VAE
    posterior mean); returns the losses."""
    trainer = cls(config_class(logdir=str(tmp_path), run_name=cls.__name__, **dict(COMMON, train_batch_size=16)), wrap(), opposite_users())
    pipe = trainer.pipeline
    trainer.encode_pair_latents = lambda b, g: pipe.encode_images(torch.cat([b.winners, b.losers]), posterior_mean=True).chunk(2)
    batch = trainer.train_pairs.load(list(range(16)))
    optimizer = torch.optim.Adam(trainer.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = trainer.compute_loss(batch, [torch.Generator().manual_seed(s) for s in list(range(8)) * 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_user_tokens_fit_opposite_preferences_that_no_user_blind_model_can(tmp_path):
    """Two users with opposite preferences on the same pairs, same noise: a user-blind model has u_1 = −u_0 on every pair, so
    its mean loss is at least log 2 (−log σ(u) − log σ(−u) ≥ 2 log 2) — Diffusion-DPO's stays there. PPD's user tokens
    (through the joint attention branch, with the LoRA) drive it towards 0 (measured 0.018 after 20 steps)."""
    blind = fit_one_batch(DiffusionDPOTrainer, DiffusionDPOConfig, tmp_path)
    assert min(blind) >= np.log(2) - 1e-5, blind
    personal = fit_one_batch(PPDTrainer, PPDConfig, tmp_path)
    assert personal[0] == pytest.approx(np.log(2), abs=1e-6)  # W_o = 0: the policy starts as the reference
    assert personal[-1] < 0.1, personal


def test_ppd_trains_on_sd3_and_its_final_folder_reloads_in_diffusers(tmp_path):
    """``train()`` on two users; the LoRA loads with StableDiffusion3Pipeline.load_lora_weights and ``user_attention/`` with
    UserCrossAttention.from_pretrained, and together they sample what the trained model samples for a user; the user tokens
    change the samples."""
    c = PPDConfig(logdir=str(tmp_path), run_name="ppd", **dict(COMMON, num_epochs=2, train_learning_rate=1e-2))
    trainer = PPDTrainer(c, wrap(), opposite_users())
    trainer.train()
    assert trainer.state.global_step == 8

    final = trainer.output_dir
    for f in trainer.final_files():
        assert os.path.isfile(os.path.join(final, f)), f
    plain = tiny_stable_diffusion_3()
    plain.load_lora_weights(final)
    layers = UserCrossAttention.from_pretrained(os.path.join(final, "user_attention"))
    assert layers.config.layer_kind == "joint_attention"
    for a, b in zip(layers.parameters(), trainer.user_layers.parameters()):
        assert torch.equal(a, b)
    layers.install(plain.transformer)
    reloaded = DiffusionPipelineForRL(plain, height=SIZE, width=SIZE)
    schedule = trainer.pipeline.make_schedule("auto", 3)
    tokens = trainer.user_tokens(trainer.user_embedding(0)[None].expand(2, -1))

    def sample(pipe, extra=None):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe.sample(["a cat", "a dog"], schedule, guidance_scale=2.0, generators=gens, extra_tokens=extra).images

    mine = sample(trainer.pipeline, tokens)
    torch.testing.assert_close(sample(reloaded, tokens), mine, rtol=1e-5, atol=1e-5)
    assert (sample(trainer.pipeline) - mine).abs().max() > 1e-4  # the user tokens change the samples
    other = trainer.user_tokens(trainer.user_embedding(1)[None].expand(2, -1))
    assert (sample(trainer.pipeline, other) - mine).abs().max() > 1e-4


def test_ppd_resume_on_sd3_is_exact(tmp_path):
    data = with_users(brightness_preferences(16), [0] * 8 + [1] * 8)

    def trainer(run, **kw):
        c = PPDConfig(logdir=str(tmp_path), run_name=run, **dict(COMMON, num_epochs=2, save_freq=1, **kw))
        return PPDTrainer(c, wrap(), data)

    full, resumed = full_and_resumed(trainer, tmp_path, 1)
    assert full.state.global_step == resumed.state.global_step == 8
    for a, b in zip(list(full.pipeline.lora_parameters()) + list(full.user_layers.parameters()),
                    list(resumed.pipeline.lora_parameters()) + list(resumed.user_layers.parameters())):
        assert torch.equal(a, b)
    assert any(float(p.detach().abs().max()) > 0 for p in full.user_layers.to_out.parameters())
