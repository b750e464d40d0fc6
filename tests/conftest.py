"""Shared fixtures: tiny random Stable Diffusion pipelines and toy differentiable rewards (no downloads)."""

import pytest
import torch

from trl_gfn.pipelines import DiffusionPipelineForRL
from trl_gfn.testing import BrightnessReward, reset_accelerate_state, tiny_stable_diffusion

# The test models are tiny: one thread is as fast as two, and it keeps the suite from stalling on
# OpenMP spin-waits when the machine is shared with other jobs.
torch.set_num_threads(1)


@pytest.fixture
def tiny_pipeline():
    return DiffusionPipelineForRL(tiny_stable_diffusion(seed=0))


@pytest.fixture
def brightness_reward():
    return BrightnessReward()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()
