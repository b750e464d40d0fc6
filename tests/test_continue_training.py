"""Continue training from a saved or pushed LoRA: ``init_from`` (a folder or a Hub id), and pipelines whose LoRA
diffusers already loaded. The round trip: train -> save -> a new run from it draws exactly the saved model's samples."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from trl_gfn import DDPOConfig, DDPOTrainer, DiffusionPipelineForRL, NablaGFlowNetConfig, NablaGFlowNetTrainer
from trl_gfn.testing import BrightnessReward, reset_accelerate_state, tiny_stable_diffusion

PROMPTS = ["a cat", "a dog"]
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def nabla_config(tmp_path, run, **overrides):
    kwargs = dict(num_epochs=1, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                  logdir=str(tmp_path), run_name=run, flow_block_out_channels=[8, 16], flow_attention_head_dim=4, reward_scale=1e6,
                  save_freq=0, log_image_freq=0, train_learning_rate=1e-2, lora_rank=4, lora_alpha=8, train_timestep_fraction=0.5)
    kwargs.update(overrides)
    return NablaGFlowNetConfig(**kwargs)


def nabla(tmp_path, run, pipeline=None, **overrides):
    reset_accelerate_state()
    return NablaGFlowNetTrainer(nabla_config(tmp_path, run, **overrides), BrightnessReward(),
                                pipeline if pipeline is not None else DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)


def first_samples(trainer):
    return trainer.sample_batch(0, 0).latents


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    trainer = nabla(tmp, "a")
    trainer.train()
    with torch.no_grad():
        assert max(p.abs().max().item() for p in trainer.pipeline.lora_parameters() if p.ndim) > 0
    return trainer, first_samples(trainer), {k: v.clone() for k, v in trainer.unwrapped.flow_head.state_dict().items()}


def test_a_new_run_from_the_final_folder_draws_the_saved_models_samples(trained, tmp_path):
    old, samples, flow = trained
    new = nabla(tmp_path, "b", init_from=old.output_dir)
    assert torch.equal(first_samples(new), samples)
    assert all(torch.equal(new.unwrapped.flow_head.state_dict()[k], v) for k, v in flow.items())
    assert new.state.epoch == 0 and new.state.global_step == 0  # a new run: counters (and optimizer) start fresh
    assert len(new.trainable_parameters()) == len(old.trainable_parameters())
    # and it trains on from there
    before = [p.detach().clone() for p in new.pipeline.lora_parameters()]
    new.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, new.pipeline.lora_parameters()))


def test_a_new_run_from_a_hub_id(trained, tmp_path, monkeypatch):
    """A pushed LoRA: the same files in the Hub cache layout, read with hf_hub_download (offline, from a cache in tmp_path)."""
    from huggingface_hub import constants

    old, samples, flow = trained
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / "models--me--tiny-nabla-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(old.output_dir, repo / "snapshots" / COMMIT)
    new = nabla(tmp_path, "c", init_from="me/tiny-nabla-lora")
    assert torch.equal(first_samples(new), samples)
    assert all(torch.equal(new.unwrapped.flow_head.state_dict()[k], v) for k, v in flow.items())
    with pytest.raises(FileNotFoundError, match=r"could not get pytorch_lora_weights\.safetensors of the Hub repo 'me/other'"):
        nabla(tmp_path, "c", init_from="me/other")


def test_a_lora_loaded_by_diffusers_is_detected_and_trained(trained, tmp_path):
    old, samples, _ = trained
    pipe = tiny_stable_diffusion()
    pipe.load_lora_weights(old.output_dir)
    wrapped = DiffusionPipelineForRL(pipe)
    assert wrapped.loaded_adapter == "default_0"
    new = nabla(tmp_path, "d", pipeline=wrapped)  # no init_from: the LoRA diffusers loaded is the policy (the flow head is new)
    assert wrapped.loaded_adapter is None and wrapped.adapter_name == "default_0"
    assert torch.equal(first_samples(new), samples)
    params = new.pipeline.lora_parameters()
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    new.train()  # trains that adapter and saves it (no KeyError: 'default')
    assert any(not torch.equal(a, b) for a, b in zip(before, new.pipeline.lora_parameters()))
    assert os.path.isfile(os.path.join(new.output_dir, "pytorch_lora_weights.safetensors"))


def test_mismatches_and_misuse_name_the_field(trained, tmp_path):
    old, _, _ = trained
    with pytest.raises(ValueError, match=r"lora_rank: .* holds a rank-4 LoRA, the config asks for rank 8"):
        nabla(tmp_path, "e", init_from=old.output_dir, lora_rank=8, lora_alpha=8)
    with pytest.raises(ValueError, match=r"lora_alpha: .* trained with lora_alpha=8, the config has 4"):
        nabla(tmp_path, "e", init_from=old.output_dir, lora_alpha=4)
    pipe = tiny_stable_diffusion()
    pipe.load_lora_weights(old.output_dir)
    with pytest.raises(ValueError, match=r"lora_alpha: the LoRA adapter 'default_0' loaded into the UNet before wrapping scales by \[2.0\]"):
        nabla(tmp_path, "e", pipeline=DiffusionPipelineForRL(pipe), lora_alpha=4)
    with pytest.raises(FileNotFoundError, match=r"did you mean .*final"):
        nabla(tmp_path, "e", init_from=os.path.dirname(old.output_dir))
    with pytest.raises(FileNotFoundError, match=r"holds trained weights .*set init_from to it"):
        nabla(tmp_path, "e", resume_from=old.output_dir)
    with pytest.raises(ValueError, match=r"init_from: cannot be combined with resume_from"):
        nabla_config(tmp_path, "e", init_from=old.output_dir, resume_from=old.output_dir)
    # a DDPO run from a Nabla-GFlowNet LoRA uses the LoRA and says that the flow head is not
    reset_accelerate_state()
    ddpo = DDPOConfig(num_epochs=1, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                      logdir=str(tmp_path), run_name="f", save_freq=0, log_image_freq=0, lora_rank=4, lora_alpha=8, init_from=old.output_dir)
    with pytest.warns(UserWarning, match=r"also holds \['flow_head'\], which DDPOTrainer does not train"):
        DDPOTrainer(ddpo, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)


def test_a_hub_module_that_cannot_be_fetched_is_an_error_and_only_a_module_the_repo_lacks_is_skipped(trained, tmp_path, monkeypatch):
    """Offline with only the LoRA cached, the flow head's files cannot be read: an error naming the file, not a fresh flow
    head. Only when the Hub answers that the repo has no flow_head/ does the run start the flow head from its
    initialisation (with a warning)."""
    import huggingface_hub
    import httpx2
    from huggingface_hub import constants, errors

    old, samples, flow = trained
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = tmp_path / "hub" / "models--me--lora-only" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--me--lora-only" / "refs").mkdir()
    (tmp_path / "hub" / "models--me--lora-only" / "refs" / "main").write_text(COMMIT)
    shutil.copy(os.path.join(old.output_dir, "pytorch_lora_weights.safetensors"), snapshot)
    with pytest.raises(FileNotFoundError, match=r"could not get flow_head/config\.json of the Hub repo 'me/lora-only'"):
        nabla(tmp_path, "g", init_from="me/lora-only")

    real = huggingface_hub.hf_hub_download

    def download(repo, filename, **kwargs):  # the Hub answers 404 for the flow head's files
        if filename.startswith("flow_head/"):
            response = httpx2.Response(404, request=httpx2.Request("GET", f"https://huggingface.co/{repo}/resolve/main/{filename}"))
            raise errors.RemoteEntryNotFoundError(f"404 {filename}", response=response)
        return real(repo, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.warns(UserWarning, match="flow_head"):
        new = nabla(tmp_path, "h", init_from="me/lora-only")
    assert torch.equal(first_samples(new), samples)  # the LoRA was loaded
