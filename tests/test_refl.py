"""ReFL: stops without gradient at a step in the configured range and trains on x̂_0; reward rise, configs, errors."""

import os

import pytest
import torch

from trl_gfn.configs.refl import ReFLConfig
from trl_gfn.pipelines import DiffusionPipelineForRL
from trl_gfn.rewards.compressibility import JpegCompressibilityReward
from trl_gfn.testing import BrightnessReward, tiny_stable_diffusion
from trl_gfn.trainers.refl import ReFLTrainer

PROMPTS = ["a cat", "a dog"]


def make(tmp_path, reward=None, **overrides):
    kwargs = dict(num_epochs=1, sample_num_steps=10, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                  logdir=str(tmp_path), run_name="run", save_freq=0, log_image_freq=0, sample_guidance_scale=3.0, lora_rank=4,
                  refl_timestep_range=[0, 300])
    kwargs.update(overrides)
    return ReFLTrainer(ReFLConfig(**kwargs), reward or BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)


def test_refl_stops_without_grad_and_trains_on_the_one_step_x0(tmp_path):
    trainer = make(tmp_path)
    timesteps = trainer.schedule.timesteps.tolist()
    allowed = [i for i, t in enumerate(timesteps) if t <= 300]
    assert trainer.refl_steps == allowed and len(allowed) == 3
    assert {trainer.stop_step([i], 0) for i in range(40)} == set(allowed)

    calls = []
    original = trainer.pipeline.guided_epsilon

    def wrapper(unet, latents, t, *args, **kwargs):
        out = original(unet, latents, t, *args, **kwargs)
        calls.append({"t": int(t[0]), "grad": out.requires_grad, "x": latents.detach().clone(), "eps": out.detach().clone()})
        return out

    trainer.pipeline.guided_epsilon = wrapper
    out = trainer.generate_with_grad(PROMPTS, [{}, {}], [5, 6], epoch=0)
    stop = trainer.stop_step([5], 0)
    assert [c["grad"] for c in calls] == [False] * stop + [True]  # no-grad down to the stop step, one call with grad there
    grad_call = calls[-1]
    assert grad_call["t"] == timesteps[stop] and 0 <= calls[-1]["t"] <= 300
    a = trainer.schedule.alphas_cumprod[stop].float()
    x0_hat = (grad_call["x"] - (1 - a).sqrt() * grad_call["eps"]) / a.sqrt()
    torch.testing.assert_close(out.latents, x0_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.images.detach(), trainer.pipeline.decode(x0_hat), rtol=1e-5, atol=1e-5)
    # the no-grad part is the sampler's path
    traj = trainer.pipeline.sample(PROMPTS, trainer.schedule, guidance_scale=3.0, generators=trainer.sample_generators(0, [5, 6]))
    torch.testing.assert_close(grad_call["x"], traj.latents[:, stop], rtol=1e-5, atol=1e-5)
    rewards, _ = trainer.compute_rewards(out.images, out.prompts, out.prompt_metadata, need_grad=True)
    (-rewards.mean()).backward()
    assert max(float(p.grad.abs().max()) for p in trainer.pipeline.lora_parameters() if p.grad is not None) > 0
    assert out.logs["refl_step"] == stop and out.logs["refl_timestep"] == timesteps[stop]


def evaluate_x0_hat(trainer, n=16):
    """Reward of the one-step prediction at a fixed late state (the quantity ReFL maximises)."""
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(n)]
    prompts = [PROMPTS[i % 2] for i in range(n)]
    traj = trainer.pipeline.sample(prompts, trainer.schedule, guidance_scale=3.0, generators=generators)
    with torch.no_grad():
        i = trainer.refl_steps[0]
        x = traj.latents[:, i]
        index = torch.full((n,), i)
        a = trainer.schedule.gather("alphas_cumprod", index, like=x)
        eps = trainer.pipeline.guided_epsilon(trainer.pipeline.unet, x, trainer.schedule.timesteps[index], traj.prompt_embeds,
                                              traj.negative_prompt_embeds, 3.0, a, "epsilon")
        return trainer.pipeline.decode((x - (1 - a).sqrt() * eps) / a.sqrt()).mean(dim=(1, 2, 3))


def test_refl_raises_a_toy_reward_and_names_itself(tmp_path):
    trainer = make(tmp_path, sample_batch_size=4, sample_num_batches_per_epoch=2, train_batch_size=4, train_learning_rate=1e-2)
    before = evaluate_x0_hat(trainer)
    trainer.train(epochs=3)
    after = evaluate_x0_hat(trainer)
    gain = (after - before).mean().item()
    stderr = (after - before).std().item() / len(before) ** 0.5
    assert gain > 1e-3 and gain > 4 * stderr, (gain, stderr)
    assert trainer.state.global_step == 6
    card = open(os.path.join(trainer.output_dir, "README.md"), encoding="utf-8").read()
    assert "ReFL" in card and "2304.05977" in card
    assert os.path.isfile(os.path.join(trainer.output_dir, "pytorch_lora_weights.safetensors"))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="not differentiable"):
        make(tmp_path, reward=JpegCompressibilityReward())
    with pytest.raises(ValueError, match=r"^refl_timestep_range: no step"):
        make(tmp_path, refl_timestep_range=[2, 10])  # the 10-step sampler's timesteps are 901, 801, ..., 1
    for bad in ([300, 0], [-1, 10], [0]):
        with pytest.raises(ValueError, match=r"^refl_timestep_range:"):
            ReFLConfig(refl_timestep_range=bad)
