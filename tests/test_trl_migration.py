"""Scripts written for TRL's former DDPOTrainer / AlignPropTrainer run on trl-gfn by changing imports only.

``tests/scripts/trl_*_script.py`` use the library exactly as TRL v0.23's ``examples/scripts/ddpo.py`` and
``alignprop.py`` used TRL (parser, project_kwargs, pipeline class, positional trainer arguments, hook, train,
save_model), on the bundled digits model; the other tests check each piece of that compatibility on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from trl_gfn import (
    AlignPropConfig,
    DDPOConfig,
    DDPOTrainer,
    DefaultDDPOStableDiffusionPipeline,
    DiffusionPipelineForRL,
)
from trl_gfn.testing import BrightnessReward, tiny_stable_diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a cat", "a dog"]


def run_script(name, args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", name), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def logged_image_tags(logging_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for root, _, files in os.walk(logging_dir):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root, size_guidance={"images": 0})
            acc.Reload()
            tags += [t for t in acc.Tags()["images"] if t != "samples"]  # "samples": trl-gfn's own image grid
    return tags


def manifest(checkpoint):
    with open(os.path.join(checkpoint, "trl_gfn_checkpoint.json"), encoding="utf-8") as f:
        return json.load(f)


def test_trl_ddpo_script_runs_unchanged_but_for_imports(tmp_path):
    run_script("trl_ddpo_script.py", ["--num_epochs", "2", "--sample_num_steps", "4", "--sample_batch_size", "2",
                                      "--sample_num_batches_per_epoch", "2", "--train_batch_size", "1", "--mixed_precision", "no",
                                      "--log_with", "tensorboard", "--per_prompt_stat_tracking", "True",
                                      "--per_prompt_stat_tracking_buffer_size", "4", "--per_prompt_stat_tracking_min_count", "2"], tmp_path)
    save = tmp_path / "save"  # project_kwargs["project_dir"]: TRL's run directory
    assert sorted(os.listdir(save / "checkpoints")) == ["checkpoint_1", "checkpoint_2"]
    assert manifest(save / "checkpoints" / "checkpoint_2")["trainer"] == "DDPOTrainer"
    assert (save / "final" / "pytorch_lora_weights.safetensors").is_file() and (save / "final" / "README.md").is_file()
    tags = logged_image_tags(tmp_path / "logs")  # project_kwargs["logging_dir"]; the hook logged "<prompt> | <reward>" per image
    assert tags and all(" | " in t and t.startswith("a handwritten digit") for t in tags)


def test_trl_alignprop_script_runs_unchanged_but_for_imports(tmp_path):
    run_script("trl_alignprop_script.py", ["--num_epochs", "2", "--sample_num_steps", "4", "--train_batch_size", "2",
                                           "--train_gradient_accumulation_steps", "2", "--truncated_rand_backprop_minmax", "0", "4",
                                           "--mixed_precision", "no", "--log_with", "tensorboard", "--sample_guidance_scale", "2.0"],
               tmp_path)
    save = tmp_path / "save"
    last = manifest(save / "checkpoints" / "checkpoint_2")
    assert last["trainer"] == "AlignPropTrainer"
    assert last["global_step"] == 2  # TRL's meaning: one optimizer step per epoch over 2 micro-batches of 2 samples
    assert last["config"]["sample_batch_size"] == 2 and last["config"]["sample_num_batches_per_epoch"] == 2
    tags = logged_image_tags(tmp_path / "logs")
    assert tags and all(t.startswith("a handwritten digit") for t in tags)
    assert (save / "final" / "pytorch_lora_weights.safetensors").is_file()


def ddpo_config(tmp_path, **overrides):
    kwargs = dict(num_epochs=1, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=2, train_batch_size=2,
                  logdir=str(tmp_path), run_name="run", save_freq=0, log_image_freq=1, lora_rank=4)
    kwargs.update(overrides)
    return DDPOConfig(**kwargs)


def test_both_argument_orders_and_the_hook_structure(tmp_path):
    seen = []

    def hook(data, step, tracker):
        seen.append((data, step, tracker))

    reward = BrightnessReward()
    native = DDPOTrainer(ddpo_config(tmp_path), reward, DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS,
                         image_samples_hook=hook)
    trl_order = DDPOTrainer(ddpo_config(tmp_path), reward, PROMPTS, DiffusionPipelineForRL(tiny_stable_diffusion()), hook)
    keyword = DDPOTrainer(ddpo_config(tmp_path), reward, prompt_function=PROMPTS, sd_pipeline=tiny_stable_diffusion(), image_samples_hook=hook)
    for trainer in (native, trl_order, keyword):
        assert isinstance(trainer.pipeline, DiffusionPipelineForRL) and trainer.prompt_source.prompts == PROMPTS
    trl_order.train()
    (data, step, tracker), = seen
    assert tracker is None  # no log_with: no tracker (TRL would have failed on trackers[0])
    assert len(data) == 2  # one entry per sampling batch
    for images, prompts, prompt_metadata, rewards, reward_metadata in data:
        assert images.shape == (2, 3, 16, 16) and len(prompts) == 2 and prompt_metadata == [{}, {}]
        assert rewards.shape == (2,) and isinstance(reward_metadata, dict)
        assert torch.allclose(rewards, images.mean(dim=(1, 2, 3)))
    with pytest.raises(TypeError, match="pipeline twice"):
        DDPOTrainer(ddpo_config(tmp_path), reward, DiffusionPipelineForRL(tiny_stable_diffusion()), PROMPTS, sd_pipeline=tiny_stable_diffusion())


def test_trl_project_kwargs_keep_their_meaning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ddpo_config(tmp_path, logdir="logs", run_name="", save_freq=1, num_epochs=3, project_kwargs={"project_dir": str(tmp_path / "save"), "total_limit": 2,
                                                                               "automatic_checkpoint_naming": True,
                                                                               "logging_dir": str(tmp_path / "tb")})
    assert config.checkpoint_limit == 2
    trainer = DDPOTrainer(config, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)
    assert trainer.run_dir == str(tmp_path / "save") and trainer.accelerator.project_configuration.automatic_checkpoint_naming is False
    trainer.train()
    assert sorted(os.listdir(tmp_path / "save" / "checkpoints")) == ["checkpoint_2", "checkpoint_3"]
    assert trainer.accelerator.logging_dir == str(tmp_path / "tb")


def test_alignprop_config_accepts_trls_defaults_and_meanings():
    c = AlignPropConfig(truncated_rand_backprop_minmax=(0, 50), train_batch_size=4, train_gradient_accumulation_steps=2)
    assert c.truncated_rand_backprop_minmax == [0, 50] and c.rand_backprop_minmax == (0, 50)
    assert (c.sample_batch_size, c.sample_num_batches_per_epoch) == (4, 2)  # an epoch: 2 micro-batches of 4, one update
    c.train_batch_size = 8
    c.validate()
    assert c.sample_batch_size == 8  # derived values follow the TRL fields they come from
    assert AlignPropConfig(sample_batch_size=8, train_batch_size=4).sample_num_batches_per_epoch == 1
    with pytest.raises(ValueError, match=r"truncated_rand_backprop_minmax: must be two integers 0 <= lo <= hi <= sample_num_steps = 50"):
        AlignPropConfig(truncated_rand_backprop_minmax=(0, 51))


def test_default_ddpo_pipeline_loads_the_models_lora_as_trl_did(tmp_path):
    model = tmp_path / "model"
    tiny_stable_diffusion().save_pretrained(model)
    plain = DefaultDDPOStableDiffusionPipeline(str(model))
    assert plain.loaded_adapter is None and plain.sd_pipeline is plain.pipeline and plain.use_lora
    lora = DiffusionPipelineForRL(tiny_stable_diffusion())
    lora.add_lora(4)
    with torch.no_grad():
        for p in lora.lora_parameters():
            p.normal_()
    lora.save_lora(model)
    continued = DefaultDDPOStableDiffusionPipeline(str(model))
    assert continued.loaded_adapter == "default_0"
    continued.ensure_lora(4, None, ["to_q", "to_k", "to_v", "to_out.0"])
    assert all(torch.equal(a, b) for a, b in zip(lora.lora_parameters(), continued.lora_parameters()))
    with pytest.raises(ValueError, match="use_lora=False: full fine-tuning is not supported"):
        DefaultDDPOStableDiffusionPipeline(str(model), use_lora=False)


def test_alignprop_draw_of_t_equal_k_trains_nothing_and_does_not_fail(tmp_path):
    """t = K, which TRL's default range can draw, differentiates no step: the micro-batch is scored, not back-propagated."""
    from trl_gfn import AlignPropTrainer

    config = AlignPropConfig(num_epochs=1, sample_num_steps=4, truncated_rand_backprop_minmax=[4, 4], train_batch_size=2, lora_rank=4,
                             logdir=str(tmp_path), run_name="run", save_freq=0, log_image_freq=0)
    trainer = AlignPropTrainer(config, BrightnessReward(), PROMPTS, DiffusionPipelineForRL(tiny_stable_diffusion()))
    before = [p.detach().clone() for p in trainer.pipeline.lora_parameters()]
    trainer.train()
    assert trainer.last_metrics["backprop_steps"] == 0 and "reward_mean" in trainer.last_metrics
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.pipeline.lora_parameters()))
