"""The optimizer step: one pass over the gradients gives the non-finite check, the logged norms and the clipping, equal to
the separate computations they replace; 8-bit Adam is wired where bitsandbytes is installed and refused clearly where not."""

import builtins
import importlib.util

import pytest
import torch

from trl_gfn import NablaGFlowNetConfig, NablaGFlowNetTrainer
from trl_gfn.pipelines import DiffusionPipelineForRL
from trl_gfn.testing import BrightnessReward, tiny_stable_diffusion


def make(tmp_path, **overrides):
    kwargs = dict(sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2, logdir=str(tmp_path),
                  flow_block_out_channels=[8, 16], flow_attention_head_dim=4, save_freq=0, log_image_freq=0, train_max_grad_norm=0.5)
    kwargs.update(overrides)
    return NablaGFlowNetTrainer(NablaGFlowNetConfig(**kwargs), BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()),
                                prompt_function=["a cat"])


def set_grads(trainer, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for p in trainer.trainable_parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale


def capture_applied_grads(trainer):
    """Record the gradients the inner optimizer's step sees (after the check and the clipping), and skip the update."""
    seen = []
    inner = trainer.optimizer.optimizer
    inner.step = lambda *a, **k: seen.append([p.grad.clone() for g in inner.param_groups for p in g["params"]])
    return seen


@pytest.mark.parametrize("scale", [0.001, 10.0])  # total norm below and above train_max_grad_norm
def test_norms_and_clipping_equal_the_separate_computations(tmp_path, scale):
    trainer = make(tmp_path)
    set_grads(trainer, scale=scale)
    expected_groups = {g["name"]: torch.stack([p.grad.norm() for p in g["params"]]).norm().item() for g in trainer.optimizer.param_groups}
    reference = [torch.nn.Parameter(torch.zeros_like(p)) for p in trainer.trainable_parameters()]
    for ref, p in zip(reference, trainer.trainable_parameters()):
        ref.grad = p.grad.clone()
    total = torch.nn.utils.clip_grad_norm_(reference, 0.5).item()
    assert (total < 0.5) == (scale < 0.01)
    seen = capture_applied_grads(trainer)
    info = trainer.optimizer_step(torch.tensor(1.0), epoch=0)
    assert set(expected_groups) == {"lora", "flow_head"}
    for name, norm in expected_groups.items():
        assert info[f"grad_norm/{name}"] == pytest.approx(norm, rel=1e-6)  # logged before clipping, as before
    for got, want in zip(seen[0], [p.grad for p in reference]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert all(p.grad is None for p in trainer.trainable_parameters())  # zeroed after the step


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_single_non_finite_gradient_entry_stops_the_step(tmp_path, bad):
    trainer = make(tmp_path)
    set_grads(trainer)
    trainer.trainable_parameters()[-1].grad.view(-1)[3] = bad
    seen = capture_applied_grads(trainer)
    with pytest.raises(FloatingPointError, match="not updated"):
        trainer.optimizer_step(torch.tensor(1.0), epoch=0)
    assert seen == [] and all(p.grad is None for p in trainer.trainable_parameters())


def test_8bit_adam_is_refused_by_name_without_bitsandbytes(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ValueError, match="train_use_8bit_adam: requires the `bitsandbytes` package"):
        NablaGFlowNetConfig(train_use_8bit_adam=True, logdir=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed (optional)")
def test_8bit_adam_keeps_8bit_state_and_trains(tmp_path):
    import bitsandbytes as bnb

    trainer = make(tmp_path, train_use_8bit_adam=True, reward_scale=10.0)
    inner = trainer.optimizer.optimizer
    assert isinstance(inner, bnb.optim.AdamW8bit)
    assert [g["name"] for g in inner.param_groups] == ["lora", "flow_head"]
    before = [p.detach().clone() for p in trainer.trainable_parameters()]
    trainer.step(0, 0)
    moved = [not torch.equal(b, p) for b, p in zip(before, trainer.trainable_parameters())]
    assert any(moved)
    states = [inner.state[p] for p in trainer.trainable_parameters() if p in inner.state]
    big = [s for p, s in zip(trainer.trainable_parameters(), states) if p.numel() >= 4096]
    assert big and all(s["state1"].dtype == torch.uint8 for s in big)  # bitsandbytes keeps tensors < 4096 in 32 bits
