"""Kill a real training process (SIGKILL, no clean-up) while it samples, right after an optimizer step and at every stage
of a checkpoint save; resume from its run directory. At most one save interval is lost, and the resumed run ends
bit-identical (CPU) to one that was never interrupted.

The kill is deterministic: ``TRL_GFN_CRASH_AT=<point>@<n>`` makes :func:`trl_gfn.trainers.checkpoints.crash_point`
SIGKILL the process the n-th time it reaches <point>.
"""

import copy
import importlib.util
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from trl_gfn.testing import reset_accelerate_state

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "crash_resume.py")
_spec = importlib.util.spec_from_file_location("crash_resume", SCRIPT)
crash_resume = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crash_resume)

SAVE_FREQ = 1  # make_trainer checkpoints every epoch: a crash may cost at most this many epochs

# (method, kill point): the runs have 3 epochs of 2 sampling batches and 2 updates each, and keep 1 checkpoint
POINTS = [
    ("nabla_gfn", "sample@3"),  # epoch 1, after its first sampling batch
    ("nabla_gfn", "optimizer_step@4"),  # epoch 1, right after its second update (new weights in memory only)
    ("nabla_gfn", "save:weights@2"),  # inside accelerator.save_state of checkpoint_2: LoRA written, flow head/optimizer not
    ("nabla_gfn", "save:files@2"),  # every file of checkpoint_2 written, no manifest yet
    ("nabla_gfn", "save:manifest@2"),  # checkpoint_2 complete in its partial folder, not renamed into place
    ("nabla_gfn", "save:published@2"),  # checkpoint_2 in place, checkpoint_1 not yet pruned
    ("nabla_gfn", "save:prune@1"),  # checkpoint_1 renamed away for deletion, not deleted
    ("ddpo", "optimizer_step@3"),  # DDPO with per-prompt stat tracking and async rewards: epoch 1, first update
    ("ddpo", "save:manifest@3"),  # the last checkpoint incomplete: resume re-runs the last epoch
]


def snapshot(trainer) -> dict:
    state = {
        "params": [p.detach().clone() for p in trainer.trainable_parameters()],
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()["state"]),
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
    }
    if getattr(trainer, "stat_tracker", None) is not None:
        state["stats"] = trainer.stat_tracker.get_stats()
    return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final state of each method's run trained without interruption (in this process)."""
    runs = {}
    for method in ("nabla_gfn", "ddpo"):
        reset_accelerate_state()
        trainer = crash_resume.make_trainer(method, str(tmp_path_factory.mktemp(method)))
        trainer.train()
        runs[method] = snapshot(trainer)
    reset_accelerate_state()
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("method,point", POINTS, ids=[f"{m}-{p}" for m, p in POINTS])
def test_killed_run_resumes_and_ends_bit_identical(tmp_path, uninterrupted, method, point):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRL_GFN_CRASH_AT=point)
    result = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "--method", method], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-4000:]
    with open(tmp_path / "progress.txt", encoding="utf-8") as f:
        trained_epochs = len(f.read().split())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = crash_resume.make_trainer(method, str(tmp_path), resume=True)
    assert trained_epochs - SAVE_FREQ <= resumed.first_epoch <= trained_epochs, (trained_epochs, resumed.first_epoch)
    resumed.train()

    final, reference = snapshot(resumed), uninterrupted[method]
    assert final["global_step"] == reference["global_step"] and final["epoch"] == reference["epoch"] == crash_resume.EPOCHS
    assert final.get("stats") == reference.get("stats")
    for a, b in zip(final["params"], reference["params"], strict=True):
        assert torch.equal(a, b)
    assert final["optimizer"].keys() == reference["optimizer"].keys()
    for k, entry in reference["optimizer"].items():
        for name, value in entry.items():
            assert torch.equal(final["optimizer"][k][name], value), (k, name)
    # nothing of the interrupted save is left behind: only the newest complete checkpoint
    assert os.listdir(tmp_path / "logs" / "run" / "checkpoints") == [f"checkpoint_{crash_resume.EPOCHS}"]


# the preference trainer with save_steps: kill points counted in its updates (6 per epoch) and saves (after updates 2, 4, 6, 8, 10)
DPO_POINTS = [
    ("optimizer_step@5", 4),  # epoch 0, update 5: resumes inside epoch 0 from checkpoint_0_step_4
    ("save:files@3", 4),  # inside the save of checkpoint_1 (update 6, epoch 0's last): resumes from checkpoint_0_step_4
    ("save:published@4", 8),  # checkpoint_1_step_8 in place, checkpoint_1 not yet pruned
    ("optimizer_step@11", 10),  # epoch 1, update 11
]


@pytest.mark.slow
@pytest.mark.parametrize("point,resumed_step", DPO_POINTS, ids=[p for p, _ in DPO_POINTS])
def test_a_killed_preference_run_resumes_inside_its_epoch_and_ends_bit_identical(tmp_path, point, resumed_step):
    reset_accelerate_state()
    full = crash_resume.make_trainer("dpo", str(tmp_path / "uninterrupted"))
    full.train()
    reset_accelerate_state()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRL_GFN_CRASH_AT=point)
    result = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "killed"), "--method", "dpo"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-4000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = crash_resume.make_trainer("dpo", str(tmp_path / "killed"), resume=True)
    # at most save_steps updates lost
    assert resumed.state.global_step == resumed_step
    assert resumed.state.epoch_updates == resumed_step % 6
    resumed.train()
    final, reference = snapshot(resumed), snapshot(full)
    assert final["global_step"] == reference["global_step"] == 6 * crash_resume.DPO_EPOCHS
    for a, b in zip(final["params"], reference["params"], strict=True):
        assert torch.equal(a, b)
    for k, entry in reference["optimizer"].items():
        for name, value in entry.items():
            assert torch.equal(final["optimizer"][k][name], value), (k, name)
    for sa, sb in zip(full.ema.shadows, resumed.ema.shadows, strict=True):
        for x, y in zip(sa, sb, strict=True):
            assert torch.equal(x, y)
    assert os.listdir(tmp_path / "killed" / "logs" / "run" / "checkpoints") == [f"checkpoint_{crash_resume.DPO_EPOCHS}"]
    reset_accelerate_state()
