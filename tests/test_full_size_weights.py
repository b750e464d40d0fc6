"""benchmarks/full_size_weights.py: the parameter counts behind the full-size memory figures of docs/model_families.md,
checked against peft (the LoRA) and the published sizes of the components."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from trl_gfn import DiffusionPipelineForRL
from trl_gfn.testing import tiny_stable_diffusion, tiny_stable_diffusion_3

ROOT = Path(__file__).resolve().parents[1]


def _weights():
    spec = importlib.util.spec_from_file_location("full_size_weights", ROOT / "benchmarks" / "full_size_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("build", [tiny_stable_diffusion, tiny_stable_diffusion_3])
def test_lora_count_equals_the_adapter_peft_adds(build):
    weights = _weights()
    pipeline = DiffusionPipelineForRL(build())
    expected = weights.lora_parameters(pipeline.denoiser, rank=4)
    pipeline.add_lora(rank=4)
    assert expected > 0
    assert sum(p.numel() for p in pipeline.lora_parameters()) == expected


def test_full_size_counts_match_the_published_model_sizes():
    """Parameters in millions of the published checkpoints (SD1.5 UNet 860, SDXL UNet 2567, SD3-medium MMDiT 2028, T5-XXL
    encoder 4762, the VAEs 84), built on the meta device: no memory, no download."""
    weights = _weights()
    rows = {r["family"]: r for r in weights.main()}
    assert rows["SD1.5 (512 px)"]["denoiser (M)"] == pytest.approx(859.5, abs=1)
    assert rows["SDXL base (1024 px)"]["denoiser (M)"] == pytest.approx(2567.5, abs=1)
    assert rows["SD3 medium (1024 px)"]["denoiser (M)"] == pytest.approx(2028.3, abs=1)
    t5 = rows["SD3 medium (1024 px)"]["text encoders (M)"] - rows["SD3 medium without T5 (1024 px)"]["text encoders (M)"]
    assert t5 == pytest.approx(4762.3, abs=2)
    for r in rows.values():
        assert r["vae (M)"] == pytest.approx(83.7, abs=0.3)
        assert r["total_gib"] > r["frozen_bf16_gib"] > 0
    assert torch.get_default_device().type == "cpu"  # the meta device did not leak
