"""Hub uploads and logs carry nothing secret or local: an explicit list of files is uploaded, credentials are
redacted from the saved, logged and uploaded config, and no local absolute path is written into an uploaded file."""

import json
import os

import pytest

from trl_gfn import DiffusionPipelineForRL, NablaGFlowNetConfig, NablaGFlowNetTrainer
from trl_gfn.configs.public import REDACTED, redact, strip_local_path
from trl_gfn.testing import BrightnessReward, tiny_stable_diffusion

SECRET = "hf_abcdefghijklmnopqrstuvwxyz123456"
API_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))

    def fake_commit(self, repo_id, operations, commit_message, **kw):
        calls["uploaded"] = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_commit)
    return calls


def test_upload_is_an_allow_list_with_no_secret_and_no_local_path(tmp_path, monkeypatch, fake_hub):
    from accelerate import Accelerator

    logged = {}
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, name, config=None, init_kwargs=None: logged.update(config=config))
    model_dir = tmp_path / "my-base-model"
    tiny_stable_diffusion().save_pretrained(model_dir)  # a local base model: its path must not reach the card
    config = NablaGFlowNetConfig(
        num_epochs=1, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2, logdir=str(tmp_path / "logs"),
        run_name="run", flow_block_out_channels=[8, 16], flow_attention_head_dim=4, save_freq=1, log_image_freq=0, lora_rank=4,
        log_with="wandb", tracker_kwargs={"wandb": {"entity": "me", "api_key": API_KEY, "settings": {"auth_token": SECRET}}},
        output_dir=str(tmp_path / "out"))
    trainer = NablaGFlowNetTrainer(config, BrightnessReward(), DiffusionPipelineForRL.from_pretrained(str(model_dir), lora_rank=4),
                                   prompt_function=["a cat"])
    trainer.train()
    (tmp_path / "out" / ".env").write_text(f"HF_TOKEN={SECRET}\n")  # stray files in the output folder
    (tmp_path / "out" / "notes.txt").write_text("private\n")
    trainer.push_to_hub("me/tiny")

    uploaded = fake_hub["uploaded"]
    assert sorted(uploaded) == sorted(["README.md", "training_config.json", "pytorch_lora_weights.safetensors", "flow_head/config.json",
                                       "flow_head/diffusion_pytorch_model.safetensors"])
    for name, data in uploaded.items():
        for needle in (SECRET, API_KEY, str(tmp_path), os.path.expanduser("~"), os.getcwd()):
            assert needle.encode() not in data, (name, needle)
    saved = json.loads(uploaded["training_config.json"])
    assert saved["tracker_kwargs"]["wandb"] == {"entity": "me", "api_key": REDACTED, "settings": {"auth_token": REDACTED}}
    assert saved["logdir"] == "<local>/logs" and saved["output_dir"] == "<local>/out" and saved["num_epochs"] == 1
    card = uploaded["README.md"].decode()
    assert "my-base-model" in card and "base_model:" not in card  # a local base model is named, not linked as a Hub id
    # the tracker gets the redacted config too; the tracker itself still gets its real init kwargs
    assert API_KEY not in json.dumps(logged["config"]) and SECRET not in json.dumps(logged["config"])
    # and the checkpoint manifest holds no credential either
    manifest = (tmp_path / "logs" / "run" / "checkpoints" / "checkpoint_1" / "trl_gfn_checkpoint.json").read_text()
    assert API_KEY not in manifest and SECRET not in manifest


def test_upload_refuses_a_missing_or_linked_file(tmp_path, fake_hub):
    from trl_gfn.trainers.hub import upload_files

    (tmp_path / "README.md").write_text("card")
    os.symlink(tmp_path / "README.md", tmp_path / "link.md")
    for files in (["README.md", "missing.safetensors"], ["link.md"], ["../outside.txt"]):
        with pytest.raises(FileNotFoundError, match="nothing was uploaded"):
            upload_files(str(tmp_path), files, "me/x")
    assert "uploaded" not in fake_hub


def test_redaction_and_path_stripping_rules():
    value = {"wandb": {"api_key": "x", "API-KEY": "y", "token": None, "entity": "me", "nested": [{"password": "p"}, SECRET]},
             "comet_ml": {"workspace": "w", "private_key": 1}}
    assert redact(value) == {"wandb": {"api_key": REDACTED, "API-KEY": REDACTED, "token": None, "entity": "me",
                                       "nested": [{"password": REDACTED}, REDACTED]},
                             "comet_ml": {"workspace": "w", "private_key": REDACTED}}
    assert strip_local_path("/home/me/runs/") == "<local>/runs"
    assert strip_local_path("~/x") == "<local>/x" and strip_local_path("C:\\\\data\\\\runs") == "<local>/runs"
    assert strip_local_path("logs") == "logs" and strip_local_path({"dir": "/a/b"}) == {"dir": "<local>/b"}


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "."])
def test_run_and_exp_names_cannot_leave_logdir(tmp_path, name):
    for field in ("run_name", "exp_name"):
        with pytest.raises(ValueError, match=rf"^{field}: must be a plain folder name"):
            NablaGFlowNetConfig(logdir=str(tmp_path), **{field: name})
    assert os.listdir(tmp_path) == []


def test_every_field_that_names_a_local_folder_is_stripped_from_the_public_config():
    from trl_gfn.configs import DDPOConfig, PPDConfig

    public = PPDConfig(ppd_embedding_provider="/home/alice/secret_project/provider").to_public_dict()
    assert public["ppd_embedding_provider"] == "<local>/provider"
    # prompt text is kept as written
    assert DDPOConfig(negative_prompts="/not a path, a prompt").to_public_dict()["negative_prompts"] == "/not a path, a prompt"
    assert PPDConfig(ppd_embedding_provider="me/provider").to_public_dict()["ppd_embedding_provider"] == "me/provider"
    assert "alice" not in str(public)
