"""Damaged, incomplete, foreign and malicious checkpoints: every problem is reported by the file or setting it concerns,
before anything is loaded, and loading a checkpoint never runs code from it."""

import json
import os
import pickle
import shutil
import warnings

import pytest
import torch

from trl_gfn import DDPOConfig, DDPOTrainer, DiffusionPipelineForRL, NablaGFlowNetConfig, NablaGFlowNetTrainer
from trl_gfn.testing import BrightnessReward, reset_accelerate_state, tiny_stable_diffusion
from trl_gfn.trainers.checkpoints import MANIFEST, CheckpointError, read_manifest, resolve_resume_path, write_manifest

PROMPTS = ["a cat", "a dog"]
FILES = ["pytorch_lora_weights.safetensors", "optimizer.bin", "random_states_0.pkl", "flow_head/config.json",
         "flow_head/diffusion_pytorch_model.safetensors", MANIFEST]


def config(logdir, **overrides):
    kwargs = dict(num_epochs=2, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                  logdir=str(logdir), run_name="run", flow_block_out_channels=[8, 16], flow_attention_head_dim=4, reward_scale=10.0,
                  save_freq=1, num_checkpoint_limit=2, log_image_freq=0, sample_guidance_scale=3.0, lora_rank=4)
    kwargs.update(overrides)
    return NablaGFlowNetConfig(**kwargs)


def nabla(logdir, **overrides):
    return NablaGFlowNetTrainer(config(logdir, **overrides), BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()),
                                prompt_function=PROMPTS)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory with complete checkpoint_1 and checkpoint_2 (copied by each test before it damages anything)."""
    reset_accelerate_state()
    logdir = tmp_path_factory.mktemp("trained")
    nabla(logdir).train()
    reset_accelerate_state()
    return logdir / "run"


@pytest.fixture
def run(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def rewrite_manifest(checkpoint):
    """Recompute the manifest's hashes after a file was changed (what someone planting a file would do)."""
    manifest = read_manifest(str(checkpoint))
    info = {k: v for k, v in manifest.items() if k not in ("format", "version", "files")}
    os.remove(checkpoint / MANIFEST)
    write_manifest(str(checkpoint), info)


def damage(path, how):
    if how == "missing":
        os.remove(path)
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # one byte altered, same size
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x55
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["missing", "truncated", "altered"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_is_named_and_the_previous_checkpoint_is_used(run, name, how):
    damage(run / "checkpoints" / "checkpoint_2" / name, how)
    expected = name if name != MANIFEST or how == "missing" else "checkpoint_2"
    # named explicitly: an error naming the file (the manifest itself, or the file whose hash no longer matches)
    with pytest.raises(CheckpointError, match="checkpoint_2") as info:
        nabla(run.parent, resume_from=str(run / "checkpoints" / "checkpoint_2"))
    assert expected in str(info.value)
    # from the run directory: checkpoint_2 is skipped with a warning that says why, checkpoint_1 is resumed
    reset_accelerate_state()
    with pytest.warns(UserWarning, match="skipped 1 newer checkpoint") as record:
        trainer = nabla(run.parent, resume_from=str(run))
    assert any(expected in str(w.message) for w in record)
    assert trainer.first_epoch == 1 and trainer.resume_path.endswith("checkpoint_1")


def test_an_interrupted_save_is_never_resumed(run):
    """A partial folder (killed save) and a checkpoint_N without manifest (killed save of an older version) are skipped."""
    checkpoints = run / "checkpoints"
    shutil.copytree(checkpoints / "checkpoint_2", checkpoints / ".checkpoint_3.partial")
    shutil.copytree(checkpoints / "checkpoint_2", checkpoints / "checkpoint_4")
    os.remove(checkpoints / "checkpoint_4" / MANIFEST)
    with pytest.warns(UserWarning, match=r"checkpoint_4 .*no trl_gfn_checkpoint.json"):
        assert resolve_resume_path(str(run)).endswith("checkpoint_2")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume_path(str(checkpoints / "checkpoint_4"))
    for name in ("checkpoint_1", "checkpoint_2"):
        os.remove(checkpoints / name / MANIFEST)
    with pytest.raises(CheckpointError, match="no complete checkpoint in"):
        resolve_resume_path(str(run))


def test_a_file_the_manifest_does_not_list_is_refused(run):
    (run / "checkpoints" / "checkpoint_2" / "custom_checkpoint_0.pkl").write_bytes(b"anything")
    with pytest.raises(CheckpointError, match=r"does not list: \['custom_checkpoint_0.pkl'\]"):
        resolve_resume_path(str(run / "checkpoints" / "checkpoint_2"))


@pytest.mark.parametrize("name,key", [("pytorch_lora_weights.safetensors", None), ("flow_head/diffusion_pytorch_model.safetensors", None),
                                      ("optimizer.bin", "exp_avg_sq")])
def test_non_finite_weights_in_a_checkpoint_are_refused(run, name, key):
    from safetensors.torch import load_file, save_file

    checkpoint = run / "checkpoints" / "checkpoint_2"
    path = checkpoint / name
    if key is None:
        state = load_file(str(path))
        first = sorted(state)[0]
        state[first] = torch.full_like(state[first], float("nan"))
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        state = torch.load(path, weights_only=True)
        entry = next(iter(state["state"].values()))
        entry[key] = torch.full_like(entry[key], float("inf"))
        torch.save(state, path)
    rewrite_manifest(checkpoint)  # a consistent checkpoint whose values are bad, as a buggy writer would leave it
    with pytest.raises(CheckpointError, match=rf"{name}.*non-finite"):
        nabla(run.parent, resume_from=str(checkpoint))


def test_a_checkpoint_of_another_trainer_or_setting_names_both(run, tmp_path):
    checkpoint = str(run / "checkpoints" / "checkpoint_2")
    with pytest.raises(CheckpointError, match=r"holds the trained modules \['lora', 'flow_head'\] but this NablaGFlowNetTrainer trains "
                                              r"\['lora'\].*use_flow_head: True in the checkpoint, False now"):
        nabla(run.parent, resume_from=checkpoint, use_flow_head=False)
    reset_accelerate_state()
    with pytest.raises(CheckpointError, match=r"flow_block_out_channels: \[8, 16\] in the checkpoint, \[8, 32\] now"):
        nabla(run.parent, resume_from=checkpoint, flow_block_out_channels=[8, 32])
    reset_accelerate_state()
    with pytest.raises(CheckpointError, match=r"LoRA weights at .*pytorch_lora_weights.safetensors.*lora_rank: 4 in the checkpoint, 8 now"):
        nabla(run.parent, resume_from=checkpoint, lora_rank=8)
    reset_accelerate_state()
    ddpo = DDPOConfig(num_epochs=1, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                      logdir=str(tmp_path), run_name="ddpo", lora_rank=4, resume_from=checkpoint, log_image_freq=0)
    with pytest.raises(CheckpointError, match="was written by NablaGFlowNetTrainer, not by DDPOTrainer"):
        DDPOTrainer(ddpo, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=PROMPTS)


class Payload:
    """Unpickling this creates the marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("manifest_updated", [False, True], ids=["as-planted", "manifest-rewritten"])
@pytest.mark.parametrize("name", [*FILES, "custom_checkpoint_0.pkl"])
def test_a_pickle_payload_in_any_checkpoint_file_never_runs(run, tmp_path, name, manifest_updated):
    checkpoint = run / "checkpoints" / "checkpoint_2"
    marker = tmp_path / "payload_ran"
    target = checkpoint / name
    if name.endswith((".bin", ".pkl")):
        torch.save({"state": Payload(marker)}, target)  # torch's zip format with the payload in its pickle
    else:
        target.write_bytes(pickle.dumps(Payload(marker)))
    if manifest_updated and name != MANIFEST:
        rewrite_manifest(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:  # noqa: PT011 - any refusal will do; what matters is that nothing ran
            nabla(run.parent, resume_from=str(checkpoint))
    assert not isinstance(info.value, AssertionError)
    assert not marker.exists(), f"code planted in {name} ran on resume"
    # the planted pickle itself is live: loading it unsafely would have run it
    if name.endswith((".bin", ".pkl")):
        torch.load(target, weights_only=False)
        assert marker.exists()


def test_resume_from_must_be_a_path():
    with pytest.raises(TypeError, match="resume_from: expected the path"):
        resolve_resume_path(123)


def test_manifest_records_counters_modules_and_file_hashes(run):
    manifest = json.loads((run / "checkpoints" / "checkpoint_2" / MANIFEST).read_text())
    assert manifest["trainer"] == "NablaGFlowNetTrainer" and manifest["epoch"] == 2 and manifest["global_step"] == 2
    assert manifest["modules"] == ["flow_head"] and manifest["state"] == {}
    assert sorted(manifest["files"]) == sorted(f for f in FILES if f != MANIFEST)
    assert not any(name.endswith(".pkl") and name.startswith("custom") for name in os.listdir(run / "checkpoints" / "checkpoint_2"))


def test_the_benchmark_reference_cache_runs_no_code(tmp_path):
    from trl_gfn.evaluation.digits_benchmark import BenchmarkSettings, compute_reference

    marker = tmp_path / "payload_ran"
    torch.save({"key": Payload(marker)}, tmp_path / "reference.pt")
    with pytest.raises(pickle.UnpicklingError):
        compute_reference(BenchmarkSettings(), cache=str(tmp_path / "reference.pt"))
    assert not marker.exists()


def test_resuming_with_train_on_previous_samples_says_what_is_not_restored(run):
    with pytest.warns(UserWarning, match="train_on_previous_samples: checkpoints do not hold the previous epoch's samples"):
        trainer = nabla(run.parent, resume_from=str(run), train_on_previous_samples=True)
    assert trainer.first_epoch == 2


def test_a_changed_manifest_is_refused_wherever_the_change_is(run):
    """The manifest carries the digest of its own content: an edit that leaves valid JSON (a renamed config key) is caught."""
    path = run / "checkpoints" / "checkpoint_2" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["config"]["train_adam_beta1_renamed"] = manifest["config"].pop("train_adam_beta1")
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with pytest.raises(CheckpointError, match=r"checkpoint_2/trl_gfn_checkpoint\.json: altered or corrupt"):
        nabla(run.parent, resume_from=str(run / "checkpoints" / "checkpoint_2"))


def test_checkpoints_inside_an_epoch_sort_between_its_boundaries(run, tmp_path):
    from trl_gfn.trainers.checkpoints import checkpoint_order, prune

    names = ["checkpoint_10", "checkpoint_1_step_12", "checkpoint_2", "checkpoint_1", "checkpoint_1_step_7", "checkpoint_x", "final"]
    assert sorted((n for n in names if checkpoint_order(n)), key=checkpoint_order) == [
        "checkpoint_1", "checkpoint_1_step_7", "checkpoint_1_step_12", "checkpoint_2", "checkpoint_10"]
    folder = tmp_path / "pruned"
    for n in names:
        (folder / n).mkdir(parents=True)
    assert prune(str(folder), 2) == ["checkpoint_1", "checkpoint_1_step_7", "checkpoint_1_step_12"]
    assert sorted(os.listdir(folder)) == ["checkpoint_10", "checkpoint_2", "checkpoint_x", "final"]
    # resume_from=<run dir> takes the newest complete one in that order
    checkpoints = run / "checkpoints"
    shutil.copytree(checkpoints / "checkpoint_1", checkpoints / "checkpoint_1_step_9")
    assert resolve_resume_path(str(run)) == str(checkpoints / "checkpoint_2")
    shutil.copytree(checkpoints / "checkpoint_2", checkpoints / "checkpoint_2_step_3")
    assert resolve_resume_path(str(run)) == str(checkpoints / "checkpoint_2_step_3")


def test_a_trainer_that_checkpoints_at_epoch_boundaries_refuses_one_inside_an_epoch(run):
    checkpoint = run / "checkpoints" / "checkpoint_2"
    manifest = read_manifest(str(checkpoint))
    manifest["epoch"], manifest["epoch_updates"] = 1, 1
    os.remove(checkpoint / MANIFEST)
    write_manifest(str(checkpoint), {k: v for k, v in manifest.items() if k not in ("format", "version", "files")})
    with pytest.raises(CheckpointError, match="inside epoch 1 .* NablaGFlowNetTrainer cannot continue: it checkpoints at epoch boundaries"):
        nabla(run.parent, resume_from=str(checkpoint))
