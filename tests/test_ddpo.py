"""DDPO: TRL parity of the per-step log-probability and the clipped loss, advantages, configs, a non-differentiable reward."""

import math
import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from trl_gfn.configs.ddpo import DDPOConfig
from trl_gfn.pipelines import DiffusionPipelineForRL, TransitionBatch
from trl_gfn.rewards.compressibility import JpegCompressibilityReward
from trl_gfn.testing import BrightnessReward, tiny_stable_diffusion
from trl_gfn.prompts.registry import PromptSource
from trl_gfn.trainers.ddpo import DDPOTrainer, PerPromptStatTracker, group_relative_advantages

PROMPTS = ["a cat", "a dog"]


def config(tmp_path, **overrides):
    kwargs = dict(num_epochs=1, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                  logdir=str(tmp_path), run_name="run", save_freq=0, log_image_freq=0, sample_guidance_scale=3.0, lora_rank=4)
    kwargs.update(overrides)
    return DDPOConfig(**kwargs)


def reference_log_prob(scheduler, unet, latents, timesteps, next_latents, embeds, negative, guidance, eta, cfg=True):
    """TRL's former DDPO step log-probability, written out from the DDIM formulas (mean over elements)."""
    if cfg:
        out = unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), encoder_hidden_states=torch.cat([negative, embeds])).sample
        uncond, cond = out.chunk(2)
        eps = uncond + guidance * (cond - uncond)
    else:
        eps = unet(latents, timesteps, encoder_hidden_states=embeds).sample
    prev = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    ac = scheduler.alphas_cumprod.to(torch.float32)
    a_t = ac[timesteps].view(-1, 1, 1, 1)
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.tensor(float(scheduler.final_alpha_cumprod))).view(-1, 1, 1, 1)
    x0 = (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    lp = -((next_latents - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("train_cfg", [True, False])
def test_log_prob_and_clipped_loss_equal_the_formulas(tmp_path, train_cfg):
    c = config(tmp_path, train_cfg=train_cfg, train_clip_range=0.02, train_adv_clip_max=2.0, sample_eta=0.8)
    trainer = DDPOTrainer(c, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)
    samples = trainer.sample_epoch(0)
    samples.extras["advantages"] = torch.tensor([3.5, -0.7])  # the first is clipped to 2.0
    steps = torch.tensor([1, 3])
    batch = TransitionBatch.from_trajectories(samples, steps)
    unet = trainer.pipeline.unet
    scheduler = DDIMScheduler.from_config(trainer.pipeline.scheduler.config)
    scheduler.set_timesteps(c.sample_num_steps)
    timesteps = scheduler.timesteps[steps]
    args = (scheduler, unet, batch.latents, timesteps, batch.next_latents, batch.prompt_embeds, batch.negative_prompt_embeds, 3.0, 0.8)
    with torch.no_grad():
        old = reference_log_prob(*args)  # the sampling policy, before any update (always guided, as TRL recorded it)
        for name, p in unet.named_parameters():  # move the policy away from the sampler so that the ratio is not 1
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)

    loss, terms = trainer.compute_loss(batch)
    grads = torch.autograd.grad(loss, trainer.pipeline.lora_parameters())

    new = reference_log_prob(*args, cfg=train_cfg)
    adv = torch.clamp(torch.tensor([3.5, -0.7]), -2.0, 2.0)
    ratio = torch.exp(new - old)
    ref_loss = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - 0.02, 1 + 0.02)))
    ref_grads = torch.autograd.grad(ref_loss, trainer.pipeline.lora_parameters())

    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["approx_kl"], 0.5 * torch.mean((new - old) ** 2).detach(), rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(terms["clipfrac"], torch.mean((torch.abs(ratio - 1.0) > 0.02).float()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-7)
    assert abs(ratio.detach() - 1).max() > 1e-4  # the test exercised a non-trivial ratio
    with torch.no_grad():
        old_impl = trainer.transition_log_prob(batch, batch.epsilons)
    torch.testing.assert_close(old_impl, old, rtol=1e-5, atol=1e-5)


def test_stat_tracker_matches_ddpo_rule():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["a", "a", "b", "a"]
    rewards = np.array([1.0, 2.0, 5.0, 3.0])
    adv = tracker.update(prompts, rewards)
    # "a" has 3 values >= min_count: its own stats; "b" has 1 < min_count: the batch's stats
    a = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(adv[[0, 1, 3]], (a - a.mean()) / (a.std() + 1e-6))
    np.testing.assert_allclose(adv[2], (5.0 - rewards.mean()) / (rewards.std() + 1e-6))
    tracker.update(["a", "a"], np.array([10.0, 11.0]))
    assert list(tracker.stats["a"]) == [2.0, 3.0, 10.0, 11.0]  # buffer keeps the newest buffer_size values
    state = tracker.state_dict()
    other = PerPromptStatTracker(4, 3)
    other.load_state_dict(state)
    assert other.get_stats() == tracker.get_stats()


def test_transitions_and_accumulation(tmp_path):
    c = config(tmp_path, sample_num_steps=10, train_timestep_fraction=0.35, train_gradient_accumulation_steps=1)
    assert c.num_train_timesteps == 3  # int(K * f), no extra last step (TRL)
    trainer = DDPOTrainer(c, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)
    assert trainer.accelerator.gradient_accumulation_steps == 3
    samples = trainer.sample_epoch(0)
    steps = trainer.select_transitions(samples, 0, 0)
    assert steps.shape == (2, 3)
    for row in steps.tolist():
        assert len(set(row)) == 3 and all(0 <= s < 10 for s in row)
    prepared = trainer.prepare_training_samples(samples)
    adv = prepared.extras["advantages"]
    torch.testing.assert_close(adv, (samples.rewards - samples.rewards.mean()) / (samples.rewards.std(unbiased=False) + 1e-8))


def test_jpeg_compressibility_trains_with_async_rewards_and_resumes(tmp_path):
    reward = JpegCompressibilityReward()
    assert reward.differentiable is False
    c = config(tmp_path, async_reward_computation=True, max_workers=2, sample_num_batches_per_epoch=2, per_prompt_stat_tracking=True,
               per_prompt_stat_tracking_buffer_size=4, per_prompt_stat_tracking_min_count=2, save_freq=1, train_timestep_fraction=0.5)
    trainer = DDPOTrainer(c, reward, DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)
    async_samples = trainer.sample_epoch(0)
    with torch.no_grad():
        sync_rewards, _ = trainer.compute_rewards(async_samples.images, async_samples.prompts, async_samples.prompt_metadata, need_grad=False)
    torch.testing.assert_close(async_samples.rewards, sync_rewards)
    assert (async_samples.rewards < 0).all()  # −kB

    trainer.train(epochs=1)
    assert trainer.state.global_step == 2  # 4 samples / train_batch_size 2, one update each
    assert np.isfinite(trainer.last_metrics["loss"]) and "clipfrac" in trainer.last_metrics
    card = open(os.path.join(trainer.output_dir, "README.md"), encoding="utf-8").read()
    assert "DDPO" in card and "2305.13301" in card and "jpeg_compressibility" in card
    assert os.path.isfile(os.path.join(trainer.output_dir, "pytorch_lora_weights.safetensors"))

    resumed = DDPOTrainer(config(tmp_path, per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=4, per_prompt_stat_tracking_min_count=2,
                                 sample_num_batches_per_epoch=2, resume_from=trainer.run_dir, output_dir=str(tmp_path / "resumed")),
                          reward, DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)
    assert resumed.first_epoch == 1 and resumed.stat_tracker.get_stats() == trainer.stat_tracker.get_stats()
    for a, b in zip(trainer.trainable_parameters(), resumed.trainable_parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(train_clip_range=0.0), "train_clip_range"),
        (dict(train_adv_clip_max=-1.0), "train_adv_clip_max"),
        (dict(max_workers=0), "max_workers"),
        (dict(per_prompt_stat_tracking_buffer_size=0), "per_prompt_stat_tracking_buffer_size"),
        (dict(per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=4, per_prompt_stat_tracking_min_count=8),
         "per_prompt_stat_tracking_min_count"),
        (dict(train_timestep_fraction=0.0), "train_timestep_fraction"),
        (dict(sample_eta=0.0), "sample_eta"),
        (dict(sample_group_size=0), "sample_group_size"),
        (dict(sample_batch_size=6, sample_group_size=4), "sample_group_size"),
        (dict(group_relative_advantages=True), "group_relative_advantages"),
        (dict(sample_batch_size=4, sample_group_size=2, group_relative_advantages=True, per_prompt_stat_tracking=True,
              per_prompt_stat_tracking_min_count=4), "group_relative_advantages"),
        (dict(kl_reference_scale=-0.1), "kl_reference_scale"),
        (dict(kl_reference_scale=float("nan")), "kl_reference_scale"),
    ],
)
def test_bad_config_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        DDPOConfig(**overrides)


def evaluate(trainer, n=16):
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(n)]
    samples = trainer.pipeline.sample([PROMPTS[i % 2] for i in range(n)], trainer.schedule, guidance_scale=3.0, generators=generators)
    return samples.images.mean(dim=(1, 2, 3))


def test_training_raises_a_toy_reward(tmp_path):
    c = config(tmp_path, sample_batch_size=8, train_batch_size=4, train_learning_rate=3e-2, train_clip_range=0.5)
    trainer = DDPOTrainer(c, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)
    before = evaluate(trainer)
    trainer.train(epochs=6)
    after = evaluate(trainer)
    gain = (after - before).mean().item()
    stderr = (after - before).std().item() / len(before) ** 0.5
    assert gain > 4 * stderr, (gain, stderr)
    assert trainer.state.global_step == 12


def test_advantages_do_not_depend_on_the_order_the_samples_arrive_in(tmp_path):
    """Several processes gather their samples in another order than one process holds them: the per-prompt buffers (and
    what a full buffer drops) must see the samples in global sample-id order either way."""
    c = config(tmp_path, sample_batch_size=4, train_batch_size=2, per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=2,
               per_prompt_stat_tracking_min_count=1)
    trainer = DDPOTrainer(c, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=["a cat"])
    samples = trainer.sample_epoch(0)
    in_order = trainer.compute_advantages(samples)
    trainer.stat_tracker.stats.clear()
    permutation = torch.tensor([3, 1, 0, 2])
    shuffled = trainer.compute_advantages(samples.select(permutation))
    torch.testing.assert_close(shuffled, in_order[permutation], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- Flow-GRPO options
MANY_PROMPTS = [f"prompt {i}" for i in range(50)]


def test_groups_share_one_prompt_drawn_per_group_and_get_group_relative_advantages(tmp_path):
    c = config(tmp_path, sample_batch_size=4, sample_num_batches_per_epoch=2, sample_group_size=2, group_relative_advantages=True)
    trainer = DDPOTrainer(c, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=MANY_PROMPTS)
    samples = trainer.sample_epoch(0)
    ids = samples.sample_ids.tolist()
    assert ids == list(range(8))
    groups = [ids[j:j + 2] for j in range(0, 8, 2)]
    drawn, _ = PromptSource(MANY_PROMPTS, seed=c.seed)([i // 2 for i in ids[::2]], 0)  # one draw per group, by group id
    for (a, b), prompt in zip(groups, drawn):
        assert samples.prompts[a] == samples.prompts[b] == prompt
    assert len(set(drawn)) > 1  # the groups drew different prompts
    assert not torch.equal(samples.latents[0, -1], samples.latents[1, -1])  # each sample of a group has its own noise

    advantages = trainer.compute_advantages(samples)
    r = samples.rewards.double().numpy()
    for a, b in groups:  # (r - group mean) / (population std + 1e-4), written out for groups of two
        mean, std = (r[a] + r[b]) / 2, abs(r[a] - r[b]) / 2
        np.testing.assert_allclose(advantages[[a, b]].double().numpy(), [(r[a] - mean) / (std + 1e-4), (r[b] - mean) / (std + 1e-4)], rtol=1e-5)
    # the group sums vanish; equal rewards in a group give 0, not 0 / 0
    torch.testing.assert_close(advantages.view(4, 2).sum(1), torch.zeros(4), atol=1e-5, rtol=0)
    same = group_relative_advantages(torch.tensor([1.0, 1.0, 2.0, 4.0]), torch.tensor([0, 0, 1, 1]))
    assert same[:2].tolist() == [0.0, 0.0] and same[2] < 0 < same[3]
    # the same advantages whatever order the samples are gathered in
    permutation = torch.tensor([5, 2, 7, 0, 1, 4, 6, 3])
    torch.testing.assert_close(trainer.compute_advantages(samples.select(permutation)), advantages[permutation], rtol=0, atol=0)


def test_group_size_one_draws_the_prompts_as_before(tmp_path):
    c = config(tmp_path, sample_batch_size=4)
    trainer = DDPOTrainer(c, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=MANY_PROMPTS)
    samples = trainer.sample_epoch(3)
    assert list(samples.prompts) == PromptSource(MANY_PROMPTS, seed=c.seed)(range(4), 3)[0]


def reference_mean_and_std(scheduler, unet, latents, timesteps, embeds, negative, guidance, eta):
    """Mean and std of the DDIM step written out from the formulas (as reference_log_prob above)."""
    out = unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), encoder_hidden_states=torch.cat([negative, embeds])).sample
    uncond, cond = out.chunk(2)
    eps = uncond + guidance * (cond - uncond)
    prev = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    ac = scheduler.alphas_cumprod.to(torch.float32)
    a_t = ac[timesteps].view(-1, 1, 1, 1)
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.tensor(float(scheduler.final_alpha_cumprod))).view(-1, 1, 1, 1)
    x0 = (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps, std


def test_kl_to_the_reference_is_the_gaussian_kl_and_vanishes_at_the_reference(tmp_path):
    c = config(tmp_path, kl_reference_scale=0.3, sample_eta=0.8)
    trainer = DDPOTrainer(c, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)
    samples = trainer.sample_epoch(0)
    samples.extras["advantages"] = torch.tensor([1.0, -0.5])
    batch = TransitionBatch.from_trajectories(samples, torch.tensor([0, 2]))
    loss, terms = trainer.compute_loss(batch)  # the LoRA starts at zero: the policy is the reference
    assert float(terms["kl_reference"]) == 0.0
    trainer.config.kl_reference_scale = 0.0
    torch.testing.assert_close(trainer.compute_loss(batch)[0], loss, rtol=0, atol=0)
    trainer.config.kl_reference_scale = 0.3

    unet = trainer.pipeline.unet
    scheduler = DDIMScheduler.from_config(trainer.pipeline.scheduler.config)
    scheduler.set_timesteps(c.sample_num_steps)
    args = (scheduler, unet, batch.latents, scheduler.timesteps[batch.step_index], batch.prompt_embeds, batch.negative_prompt_embeds, 3.0, 0.8)
    with torch.no_grad():
        mean_ref, std = reference_mean_and_std(*args)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    loss, terms = trainer.compute_loss(batch)
    grads = torch.autograd.grad(loss, trainer.pipeline.lora_parameters())
    trainer.config.kl_reference_scale = 0.0
    ppo_loss, _ = trainer.compute_loss(batch)
    ppo_grads = torch.autograd.grad(ppo_loss, trainer.pipeline.lora_parameters())

    mean, _ = reference_mean_and_std(*args)
    gaussian = torch.distributions.Normal(mean, std.expand_as(mean))
    kl = torch.distributions.kl_divergence(gaussian, torch.distributions.Normal(mean_ref, std.expand_as(mean))).mean()
    kl_grads = torch.autograd.grad(kl, trainer.pipeline.lora_parameters())
    assert float(kl.detach()) > 1e-4
    torch.testing.assert_close(terms["kl_reference"], kl.detach(), rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(loss, ppo_loss + 0.3 * kl.detach(), rtol=1e-4, atol=1e-7)
    for g, p, k in zip(grads, ppo_grads, kl_grads):
        torch.testing.assert_close(g, p + 0.3 * k, rtol=1e-3, atol=1e-7)


def test_the_kl_term_keeps_the_policy_near_the_reference(tmp_path):
    """The same run with and without the KL term: the KL pulls the trained step back towards the reference's."""

    def train(kl_scale):
        c = config(tmp_path, run_name=f"kl{kl_scale}", sample_batch_size=4, train_batch_size=4, train_learning_rate=3e-2, train_clip_range=0.5,
                   sample_group_size=2, group_relative_advantages=True, kl_reference_scale=kl_scale)
        trainer = DDPOTrainer(c, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)
        trainer.train(epochs=4)
        samples = trainer.sample_epoch(10)
        batch = TransitionBatch.from_trajectories(samples, torch.tensor([0, 1, 2, 3]))
        with torch.no_grad():
            return float(trainer.reference_kl(batch, trainer.policy_epsilon(batch)).mean())

    free, held = train(0.0), train(100.0)
    assert free > 0 and held < 0.5 * free, (free, held)
