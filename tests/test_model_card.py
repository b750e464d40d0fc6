"""The model card is a huggingface_hub ModelCard whose metadata parses back: base model id, license, pipeline tag,
library, tags; its usage example uses the run's own prompts."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard

from trl_gfn import DDPOConfig, DDPOTrainer, DiffusionPipelineForRL, NablaGFlowNetConfig, NablaGFlowNetTrainer
from trl_gfn.testing import BrightnessReward, reset_accelerate_state, tiny_stable_diffusion
from trl_gfn.trainers.hub import base_model_hub_id

PROMPTS = ["a red cube on a table", "a blue sphere"]
SNAPSHOT = "0" * 40


def ddpo(tmp_path, model_dir, **overrides):
    reset_accelerate_state()
    kwargs = dict(num_epochs=1, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2, lora_rank=4,
                  logdir=str(tmp_path / "logs"), run_name="run", save_freq=0, log_image_freq=0)
    kwargs.update(overrides)
    return DDPOTrainer(DDPOConfig(**kwargs), BrightnessReward(), DiffusionPipelineForRL.from_pretrained(str(model_dir), lora_rank=4),
                       prompt_function=PROMPTS)


def test_card_metadata_parses_back_for_a_hub_base_model(tmp_path):
    # the base model as diffusers leaves it in the HF cache when loaded by id
    model_dir = tmp_path / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / SNAPSHOT
    tiny_stable_diffusion().save_pretrained(model_dir)
    trainer = ddpo(tmp_path, model_dir)
    trainer.train()
    card = ModelCard.load(os.path.join(trainer.output_dir, "README.md"))
    data = card.data
    assert data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the Hub id, not the local path
    assert data.license == "creativeml-openrail-m"  # the base model's license
    assert data.pipeline_tag == "text-to-image" and data.library_name == "diffusers"
    assert {"trl-gfn", "ddpo", "lora"} <= set(data.tags)
    assert 'StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")' in card.text
    assert any(f'pipeline("{p}"' in card.text for p in PROMPTS) and "a photo of a cat" not in card.text
    assert str(tmp_path) not in card.content and "DDPO" in card.text and "2305.13301" in card.text


def test_card_of_a_local_base_model_reads_its_license_and_names_no_hub_id(tmp_path, monkeypatch):
    model_dir = tmp_path / "my-base-model"
    tiny_stable_diffusion().save_pretrained(model_dir)
    (model_dir / "README.md").write_text("---\nlicense: mit\n---\n# my base model\n")
    reset_accelerate_state()
    config = NablaGFlowNetConfig(num_epochs=1, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                                 lora_rank=4, logdir=str(tmp_path / "logs"), run_name="run", save_freq=0, log_image_freq=0,
                                 flow_block_out_channels=[8, 16], flow_attention_head_dim=4)
    trainer = NablaGFlowNetTrainer(config, BrightnessReward(), DiffusionPipelineForRL.from_pretrained(str(model_dir), lora_rank=4),
                                   prompt_function=PROMPTS)
    text = trainer.create_model_card(repo_id="me/tiny", dataset_name="me/prompts", tags=["digits"])
    card = ModelCard(text)
    assert card.data.base_model is None and card.data.license == "mit"
    assert card.data.datasets == ["me/prompts"] and {"trl-gfn", "nabla-gflownet", "digits"} <= set(card.data.tags)
    assert "`my-base-model` (a local model)" in card.text and str(tmp_path) not in text
    assert f'pipeline("{PROMPTS[0]}"' in card.text  # before training: the first prompt of the run's list
    assert 'load_lora_weights("me/tiny")' in card.text


def test_base_model_hub_id():
    assert base_model_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert base_model_hub_id(f"/c/hub/models--org--name.v2/snapshots/{SNAPSHOT}") == "org/name.v2"
    assert base_model_hub_id("/home/me/models/sd") is None and base_model_hub_id("./sd") is None and base_model_hub_id("") is None


def test_the_licenses_of_the_sdxl_and_sd3_bases_of_the_example_configs_are_known_offline():
    from trl_gfn.trainers.hub import base_model_license, build_model_card

    common = dict(repo_id="me/lora", base_model="", method="DDPO", method_tag="ddpo", paper="p", citation="", reward="r", config={},
                  key_fields=[], metrics={}, prompts=["a cat"])
    sdxl, sd3 = "stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-3-medium-diffusers"
    assert base_model_license(sdxl, sdxl) == "openrail++"
    data = ModelCard(str(build_model_card(base_model_id=sd3, license=base_model_license(sd3, sd3), **common))).data
    assert data.license == "other" and data.license_name == "stabilityai-ai-community"
    assert data.license_link.endswith("stable-diffusion-3-medium/blob/main/LICENSE.md")
