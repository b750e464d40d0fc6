"""Bad input gives clear errors; a non-finite loss never reaches the weights or a checkpoint; Hub upload offline."""

import os

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from trl_gfn import DiffusionPipelineForRL, NablaGFlowNetConfig, NablaGFlowNetTrainer
from trl_gfn.rewards.base import RewardModel
from trl_gfn.testing import BrightnessReward, tiny_stable_diffusion

PROMPTS = ["a cat", "a dog"]


def config(tmp_path, **overrides):
    kwargs = dict(num_epochs=1, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                  logdir=str(tmp_path), run_name="run", flow_block_out_channels=[8, 16], flow_attention_head_dim=4, reward_scale=10.0,
                  save_freq=0, log_image_freq=0, sample_guidance_scale=3.0, lora_rank=4)
    kwargs.update(overrides)
    return NablaGFlowNetConfig(**kwargs)


def trainer_with(tmp_path, reward, **overrides):
    return NablaGFlowNetTrainer(config(tmp_path, **overrides), reward, DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)


class Fn(RewardModel):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def score(self, images, prompts, prompt_metadata):
        return self.fn(images)


BAD_REWARDS = [
    (lambda im, p, m: (im.mean(dim=(2, 3)), {}), r"shape \({n}, 3\); expected \({n},\)"),
    (lambda im, p, m: (im.mean(dim=(1, 2, 3)) * float("nan"), {}), "non-finite rewards"),
    (lambda im, p, m: im.mean(dim=(1, 2, 3)), "must return a pair"),
]


@pytest.mark.parametrize("reward,match", BAD_REWARDS)
def test_bad_rewards_are_rejected_at_start_by_a_gradient_trainer(tmp_path, reward, match):
    """Gradient trainers probe the reward when they are built: one image, so the batch size in the message is 1."""
    with pytest.raises(ValueError, match="probe call at start-up.*" + match.format(n=1)):
        trainer_with(tmp_path, reward)


@pytest.mark.parametrize("reward,match", BAD_REWARDS)
def test_bad_rewards_are_rejected_at_sampling(tmp_path, reward, match):
    from trl_gfn import DDPOConfig, DDPOTrainer  # DDPO never differentiates the reward: it is first called when scoring samples

    ddpo = DDPOConfig(num_epochs=1, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                      logdir=str(tmp_path), run_name="run", save_freq=0, log_image_freq=0, lora_rank=4)
    trainer = DDPOTrainer(ddpo, reward, DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)
    with pytest.raises(ValueError, match=match.format(n=2)):
        trainer.sample_epoch(0)


def test_reward_without_gradient_is_rejected_by_a_gradient_trainer(tmp_path):
    with pytest.raises(ValueError, match=r"probe call at start-up .*without a gradient w\.r\.t\. the images"):
        trainer_with(tmp_path, lambda im, p, m: (im.mean(dim=(1, 2, 3)).detach(), {}))

    def numpy_reward(im, p, m):
        return torch.as_tensor(im.detach().numpy().mean(axis=(1, 2, 3))), {}

    with pytest.raises(ValueError, match="without a gradient"):
        trainer_with(tmp_path, numpy_reward)


def test_missing_resume_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume_from"):
        trainer_with(tmp_path, BrightnessReward(), resume_from=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint_N"):
        trainer_with(tmp_path, BrightnessReward(), resume_from=str(tmp_path / "empty"))


def test_unsupported_pipelines_and_schedulers(tmp_path):
    unconditional = DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8,
                                                  down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                                 scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="has no `vae`"):
        DiffusionPipelineForRL(unconditional)
    with pytest.raises(TypeError, match="pipeline must be"):
        NablaGFlowNetTrainer(config(tmp_path), BrightnessReward(), object())
    pipe = tiny_stable_diffusion()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, thresholding=True)
    with pytest.raises(ValueError, match="thresholding"):
        NablaGFlowNetTrainer(config(tmp_path), BrightnessReward(), DiffusionPipelineForRL(pipe), prompt_function=PROMPTS)
    with pytest.raises(ValueError, match="sampler"):
        config(tmp_path, sampler="euler")


@pytest.mark.parametrize("field,value,match", [
    ("train_timestep_fraction", 0.0, "train_timestep_fraction"),
    ("sample_eta", 0.0, "sample_eta"),
    ("reward_gradient_scaling", "cube", "reward_gradient_scaling"),
    ("train_batch_size", 3, "train_batch_size"),
    ("mixed_precision", "fp8", "mixed_precision"),
    ("flow_attention_head_dim", 3, "flow_attention_head_dim"),
    ("unet_reg_scale", -1.0, "unet_reg_scale"),
    ("push_to_hub", True, "hub_model_id"),
])
def test_config_errors_name_the_field(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **{field: value})


def test_a_non_finite_loss_never_reaches_weights_or_checkpoints(tmp_path):
    trainer = trainer_with(tmp_path, BrightnessReward(), save_freq=1, num_epochs=3)
    trainer.train(epochs=1)
    before = [p.detach().clone() for p in trainer.trainable_parameters()]
    original = trainer.compute_loss

    def poisoned(batch):
        loss, terms = original(batch)
        return loss * float("nan"), terms

    trainer.compute_loss = poisoned
    with pytest.raises(FloatingPointError, match="not updated"):
        trainer.train()
    for a, b in zip(before, trainer.trainable_parameters()):
        assert torch.equal(a, b)
    assert os.listdir(os.path.join(trainer.run_dir, "checkpoints")) == ["checkpoint_1"]


def test_push_to_hub_uploads_lora_flow_head_and_card(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))

    def fake_commit(self, repo_id, operations, commit_message, **kw):
        calls["files"] = sorted(op.path_in_repo for op in operations)
        calls["card"] = next(open(op.path_or_fileobj, encoding="utf-8").read() for op in operations if op.path_in_repo == "README.md")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_commit)
    trainer = trainer_with(tmp_path, BrightnessReward())
    trainer.train()
    trainer.push_to_hub("me/tiny-nabla-lora")
    assert calls["repo"] == "me/tiny-nabla-lora"
    assert calls["files"] == sorted(["pytorch_lora_weights.safetensors", "README.md", "training_config.json", "flow_head/config.json",
                                     "flow_head/diffusion_pytorch_model.safetensors"])
    card = calls["card"]
    for needle in ("Nabla-GFlowNet", "2412.07775", "BrightnessReward", 'load_lora_weights("me/tiny-nabla-lora")', "reward_scale", "reward_mean"):
        assert needle in card, needle


def test_from_pretrained_never_falls_back_to_random_weights(tmp_path):
    with pytest.raises(Exception) as info:
        DiffusionPipelineForRL.from_pretrained(str(tmp_path / "no-such-model"))
    assert not isinstance(info.value, AssertionError)
    saved = tmp_path / "tiny"
    tiny_stable_diffusion().save_pretrained(saved)
    os.remove(next(p for p in (saved / "unet").iterdir() if p.suffix == ".safetensors"))
    with pytest.raises(Exception, match="(?i)no file named|error|not found"):
        DiffusionPipelineForRL.from_pretrained(str(saved))


@pytest.mark.parametrize("output,match", [
    (("a cat", ["not", "a dict"]), r"metadata of type list"),
    (("a cat", "style"), r"metadata of type str"),
    ((1, {}), r"prompt of type int"),
    ("a cat", r"got 'a cat'"),
])
def test_a_prompt_function_returning_the_wrong_types_is_named(tmp_path, output, match):
    trainer = trainer_with(tmp_path, BrightnessReward())
    trainer.prompt_source = type(trainer.prompt_source)(lambda: output)
    with pytest.raises(ValueError, match=rf"prompt_function must return \(prompt: str, metadata: dict or None\).*{match}"):
        trainer.sample_epoch(0)


def test_a_corrupt_lora_file_is_named(tmp_path):
    trainer = trainer_with(tmp_path, BrightnessReward())
    trainer.pipeline.save_lora(tmp_path / "lora")
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"LoRA weights: {path} is not a readable safetensors file"):
        trainer.pipeline.load_lora(tmp_path / "lora")
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=rf"LoRA weights: no file {path}"):
        trainer.pipeline.load_lora(tmp_path / "lora")


def test_resume_from_of_the_wrong_type_is_named(tmp_path):
    with pytest.raises(ValueError, match="^resume_from: expected a string, got 123"):
        config(tmp_path, resume_from=123)


def _recorded_update_gradients(trainer, epochs=1):
    """The gradient each optimizer step applies (after accumulation), per parameter group."""
    grads = []
    inner = trainer.optimizer.optimizer
    original = inner.step

    def recording(*args, **kwargs):
        grads.append([p.grad.detach().clone() for group in inner.param_groups for p in group["params"]])
        return original(*args, **kwargs)

    inner.step = recording
    trainer.train(epochs=epochs)
    return grads


def test_two_trainers_in_one_process_keep_their_own_gradient_scale(tmp_path):
    """accelerate keeps the accumulation steps in a process-wide singleton: building a DDPO trainer (10 backward passes per
    update) must not change how an existing Nabla-GFlowNet trainer (2 per update) scales and steps, nor the reverse."""
    from trl_gfn import DDPOConfig, DDPOTrainer
    from trl_gfn.testing import reset_accelerate_state

    def ddpo(name):
        c = DDPOConfig(num_epochs=1, sample_num_steps=10, train_timestep_fraction=1.0, sample_batch_size=2, sample_num_batches_per_epoch=1,
                       train_batch_size=2, logdir=str(tmp_path / name), run_name="run", save_freq=0, log_image_freq=0, lora_rank=4)
        return DDPOTrainer(c, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)

    def nabla(name):
        return trainer_with(tmp_path / name, BrightnessReward(), train_timestep_fraction=0.25)

    alone_nabla = _recorded_update_gradients(nabla("n0"))
    reset_accelerate_state()
    alone_ddpo = _recorded_update_gradients(ddpo("d0"))
    reset_accelerate_state()
    first, second = nabla("n1"), ddpo("d1")  # both built before either trains
    assert first.accumulation_steps == 2 and second.accumulation_steps == 10
    together_nabla = _recorded_update_gradients(first)
    together_ddpo = _recorded_update_gradients(second)
    for alone, together in ((alone_nabla, together_nabla), (alone_ddpo, together_ddpo)):
        assert len(alone) == len(together) == 1  # one update per epoch for both
        for a, b in zip(alone[0], together[0], strict=True):
            assert torch.equal(a, b)


def test_a_launch_that_asked_for_several_processes_but_started_one_warns(tmp_path, monkeypatch):
    """`accelerate launch --num_processes 2 script.py` without --multi_gpu: accelerate starts one process (MASTER_ADDR, no WORLD_SIZE)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match=r"--num_processes > 1 but started ONE process.*--multi_gpu"):
        trainer_with(tmp_path, BrightnessReward())


def test_every_name_in_a_trainer_module_s_all_exists():
    import importlib

    for name in ("base", "online", "ddpo", "nabla_gfn", "draft", "publishing", "hub", "initial_weights"):
        module = importlib.import_module(f"trl_gfn.trainers.{name}")
        missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
        assert not missing, (name, missing)
