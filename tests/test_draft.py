"""DRaFT-K / DRaFT-LV / AlignProp: where the gradient goes, the re-noised copies, reward rise, configs, errors."""

import os

import pytest
import torch

from trl_gfn.configs.draft import AlignPropConfig, DRaFTConfig
from trl_gfn.pipelines import DiffusionPipelineForRL
from trl_gfn.rewards.compressibility import JpegCompressibilityReward
from trl_gfn.testing import BrightnessReward, tiny_stable_diffusion
from trl_gfn.trainers.draft import AlignPropTrainer, DRaFTTrainer

PROMPTS = ["a cat", "a dog"]


def config(tmp_path, cls=DRaFTConfig, **overrides):
    kwargs = dict(num_epochs=1, sample_num_steps=5, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                  logdir=str(tmp_path), run_name="run", save_freq=0, log_image_freq=0, sample_guidance_scale=3.0, lora_rank=4)
    kwargs.update(overrides)
    return cls(**kwargs)


def make(tmp_path, cls=DRaFTTrainer, reward=None, **overrides):
    c = config(tmp_path, cls=cls.config_class, **overrides)
    return cls(c, reward or BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)


def record_calls(trainer):
    """Wrap guided_epsilon: record each call's timestep, batch, input latents, whether its output carries a graph, and
    (after backward) the gradient of the loss w.r.t. that output."""
    calls = []
    original = trainer.pipeline.guided_epsilon

    def wrapper(unet, latents, timesteps, *args, **kwargs):
        out = original(unet, latents, timesteps, *args, **kwargs)
        entry = {"t": int(timesteps[0]), "batch": latents.shape[0], "latents": latents.detach().clone(), "grad": out.requires_grad,
                 "out": out.detach().clone(), "grad_norm": None}
        if out.requires_grad:
            out.register_hook(lambda g, e=entry: e.__setitem__("grad_norm", float(g.norm())))
        calls.append(entry)
        return out

    trainer.pipeline.guided_epsilon = wrapper
    return calls


def backward_once(trainer, ids=(0, 1)):
    out = trainer.generate_with_grad(PROMPTS, [{}, {}], list(ids), epoch=0)
    rewards, _ = trainer.compute_rewards(out.images, out.prompts, out.prompt_metadata, need_grad=True)
    (-rewards.mean()).backward()
    return out


@pytest.mark.parametrize("k", [2, 0])
def test_draft_k_gradients_reach_only_the_last_k_steps(tmp_path, k):
    trainer = make(tmp_path, draft_k=k)
    calls = record_calls(trainer)
    out = backward_once(trainer)
    K = 5
    n_grad = K if k == 0 else k
    assert [c["t"] for c in calls] == trainer.schedule.timesteps.tolist()
    assert [c["grad"] for c in calls] == [False] * (K - n_grad) + [True] * n_grad
    assert all(c["grad_norm"] is not None and c["grad_norm"] > 0 for c in calls[K - n_grad:])
    lora_grads = [p.grad for p in trainer.pipeline.lora_parameters() if p.grad is not None]
    assert lora_grads and max(float(g.abs().max()) for g in lora_grads) > 0
    # the path with gradient is the sampler's path: same final latents as the no-grad sampler with the same seeds
    traj = trainer.pipeline.sample(PROMPTS, trainer.schedule, guidance_scale=3.0, generators=trainer.sample_generators(0, [0, 1]))
    torch.testing.assert_close(out.latents, traj.latents[:, -1], rtol=1e-5, atol=1e-5)
    assert out.logs["backprop_steps"] == n_grad


def test_draft_lv_renoises_x0_into_n_copies_of_x1(tmp_path):
    n = 3
    trainer = make(tmp_path, draft_lv_copies=n)
    calls = record_calls(trainer)
    out = backward_once(trainer)
    K = 5
    assert [c["grad"] for c in calls] == [False] * K + [True]  # K no-grad steps to x_0, then the last step again with grad
    last = calls[-1]
    assert last["t"] == int(trainer.schedule.timesteps[-1]) and last["batch"] == 2 * n and last["grad_norm"] > 0
    assert out.images.shape[0] == 2 * n and out.prompts == PROMPTS * n
    traj = trainer.pipeline.sample(PROMPTS, trainer.schedule, guidance_scale=3.0, generators=trainer.sample_generators(0, [0, 1]))
    x0 = traj.latents[:, -1]
    r = float(trainer.schedule.alphas_cumprod[K - 1] / trainer.schedule.alphas_cumprod[K])
    z = (last["latents"] - r**0.5 * x0.repeat(n, 1, 1, 1)) / (1 - r) ** 0.5
    assert abs(float(z.mean())) < 0.15 and abs(float(z.std()) - 1) < 0.15  # x_1^i ~ q(x_1 | x_0)
    assert not torch.allclose(last["latents"][:2], last["latents"][2:4])  # distinct copies


def test_alignprop_randomised_truncation(tmp_path):
    trainer = make(tmp_path, cls=AlignPropTrainer, truncated_rand_backprop_minmax=[1, 3])
    starts = {trainer.first_grad_step([i], 0) for i in range(40)}
    assert starts == {1, 2, 3}
    calls = record_calls(trainer)
    out = backward_once(trainer, ids=(7, 8))
    start = trainer.first_grad_step([7], 0)
    assert [c["grad"] for c in calls] == [i >= start for i in range(5)] and out.logs["backprop_steps"] == 5 - start
    fixed = AlignPropConfig(sample_num_steps=5, truncated_backprop_rand=False, truncated_backprop_timestep=3)
    assert fixed.num_backprop_steps == 2


def evaluate(trainer, n=16):
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(n)]
    samples = trainer.pipeline.sample([PROMPTS[i % 2] for i in range(n)], trainer.schedule, guidance_scale=3.0, generators=generators)
    return samples.images.mean(dim=(1, 2, 3))


def test_draft_raises_a_toy_reward_saves_a_card_and_resumes(tmp_path):
    trainer = make(tmp_path, sample_batch_size=4, sample_num_batches_per_epoch=2, train_batch_size=4, train_learning_rate=1e-2, save_freq=1)
    before = evaluate(trainer)
    trainer.train(epochs=3)
    after = evaluate(trainer)
    gain = (after - before).mean().item()
    stderr = (after - before).std().item() / len(before) ** 0.5
    assert gain > 1e-3 and gain > 4 * stderr, (gain, stderr)
    assert trainer.state.global_step == 6 and "reward_mean" in trainer.last_metrics
    card = open(os.path.join(trainer.output_dir, "README.md"), encoding="utf-8").read()
    assert "DRaFT-K (K=1)" in card and "2309.17400" in card
    resumed = make(tmp_path, sample_batch_size=4, sample_num_batches_per_epoch=2, train_batch_size=4, resume_from=trainer.run_dir,
                   output_dir=str(tmp_path / "resumed"))
    assert resumed.first_epoch == 3 and resumed.state.global_step == 6
    for a, b in zip(trainer.trainable_parameters(), resumed.trainable_parameters()):
        assert torch.equal(a, b)


def test_non_differentiable_rewards_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not differentiable.*DDPOTrainer"):
        make(tmp_path, reward=JpegCompressibilityReward())

    def detached(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)).detach(), {}

    with pytest.raises(ValueError, match="probe call at start-up.*without a gradient"):  # at construction, not after sampling
        make(tmp_path, reward=detached)


@pytest.mark.parametrize(
    "cls, overrides, field",
    [
        (DRaFTConfig, dict(draft_k=-1), "draft_k"),
        (DRaFTConfig, dict(draft_k=6), "draft_k"),
        (DRaFTConfig, dict(draft_lv_copies=-1), "draft_lv_copies"),
        (DRaFTConfig, dict(draft_lv_copies=2, draft_k=2), "draft_k"),
        (DRaFTConfig, dict(draft_lv_copies=2, truncated_backprop_rand=True), "truncated_backprop_rand"),
        (DRaFTConfig, dict(truncated_backprop_rand=True, truncated_rand_backprop_minmax=[3, 1]), "truncated_rand_backprop_minmax"),
        (DRaFTConfig, dict(truncated_backprop_rand=True, truncated_rand_backprop_minmax=[0, 6]), "truncated_rand_backprop_minmax"),
        (AlignPropConfig, dict(truncated_backprop_rand=False, truncated_backprop_timestep=5), "truncated_backprop_timestep"),
        (AlignPropConfig, dict(truncated_backprop_rand=False, truncated_backprop_timestep=2, draft_k=2), "draft_k"),
        (DRaFTConfig, dict(train_learning_rate=0.0), "train_learning_rate"),
    ],
)
def test_bad_config_values_name_the_field(cls, overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        cls(sample_num_steps=5, **overrides)
