"""Every field of every config rejects bad values by name: wrong types (no coercion of 'False' to True), non-finite
numbers, values out of range, unsafe names and malformed kwargs dicts, before any work starts."""

import dataclasses
import math
import typing
import warnings

import pytest

from trl_gfn.configs import AlignPropConfig, DDPOConfig, DiffusionRLConfig, DRaFTConfig, NablaGFlowNetConfig, ReFLConfig
from trl_gfn.configs.validation import Range, field_ranges, field_types

CONFIGS = [DiffusionRLConfig, NablaGFlowNetConfig, DDPOConfig, DRaFTConfig, AlignPropConfig, ReFLConfig]


def _split_optional(annotation):
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], type(None) in args
    return annotation, False


def _out_of_range(bounds: Range | None, integer: bool) -> list:
    if bounds is None:
        return []
    out = []
    step = 1 if integer else 1e-3
    if bounds.lo is not None:
        out.append(bounds.lo if bounds.lo_open else bounds.lo - step)
        out.append(bounds.lo - 1000)
    if bounds.hi is not None:
        out.append(bounds.hi if bounds.hi_open else bounds.hi + step)
    return [int(v) if integer else float(v) for v in out]


def bad_values(annotation, bounds):
    """Values of the wrong type, non-finite or out of range for a field of this annotation and range."""
    base, optional = _split_optional(annotation)
    none = [] if optional else [None]
    origin = typing.get_origin(base)
    if base is bool:
        return ["False", "True", 1, 0, *none]
    if base is int:
        return ["1", 1.5, True, float("nan"), *none, *_out_of_range(bounds, integer=True)]
    if base is float:
        return ["0.5", True, float("nan"), float("inf"), -float("inf"), *none, *_out_of_range(bounds, integer=False)]
    if base is str:
        return [1, b"bytes", ["a"], *none]
    if origin is typing.Literal:
        return ["not-a-choice", 1, *none]
    if origin is list:
        item = typing.get_args(base)[0]
        values = ["1", 1, [], {"a": 1}, *none]
        if item is int:
            values += [["a"], [1.5], [True], *([[v] for v in _out_of_range(bounds, integer=True)])]
        if item is str:
            values += ["to_q", [1], [None]]
        return values
    if origin is dict:
        return ["{}", [], 1, {1: {}}, *none]
    raise AssertionError(f"no bad values for {annotation!r}: extend this test")


CASES = [(cls, name, value) for cls in CONFIGS for name, annotation in field_types(cls).items()
         for value in bad_values(annotation, field_ranges(cls).get(name))]


@pytest.mark.parametrize("cls,name,value", CASES, ids=[f"{c.__name__}-{n}-{i}" for i, (c, n, _) in enumerate(CASES)])
def test_every_field_rejects_bad_values_by_name(cls, name, value):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=rf"^{name}: "):
            cls(**{name: value})


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_numeric_field_declares_its_range(cls):
    numeric = {name for name, annotation in field_types(cls).items()
               if _split_optional(annotation)[0] in (int, float) or typing.get_args(_split_optional(annotation)[0]) == (int,)}
    missing = numeric - set(field_ranges(cls))
    assert not missing, f"{cls.__name__}: numeric fields without a range in field_ranges: {sorted(missing)}"


@pytest.mark.parametrize("overrides,field", [
    # the issue's examples: silently accepted, or failing without the field's name
    (dict(allow_tf32="False"), "allow_tf32"),
    (dict(gradient_checkpointing="False"), "gradient_checkpointing"),
    (dict(train_adam_epsilon=math.inf), "train_adam_epsilon"),
    (dict(train_max_grad_norm=math.nan), "train_max_grad_norm"),
    (dict(log_num_images=0), "log_num_images"),
    (dict(flow_attention_head_dim=0), "flow_attention_head_dim"),
    (dict(flow_block_out_channels=[8, 0]), "flow_block_out_channels"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**32), "seed"),
    (dict(lora_target_modules="to_q"), "lora_target_modules"),
    (dict(lora_target_modules=[""]), "lora_target_modules"),
    (dict(resume_from=123), "resume_from"),
    (dict(run_name="../../x"), "run_name"),
    (dict(run_name="a/b"), "run_name"),
    (dict(run_name=".."), "run_name"),
    (dict(exp_name=""), "exp_name"),
    (dict(exp_name="..\\x"), "exp_name"),
    (dict(logdir=""), "logdir"),
    (dict(hub_model_id="not a repo id"), "hub_model_id"),
    (dict(prompt_set="no_such_set"), "prompt_set"),
    (dict(accelerator_kwargs={"not_an_argument": 1}), "accelerator_kwargs"),
    (dict(accelerator_kwargs={"mixed_precision": "fp16"}), "accelerator_kwargs"),
    (dict(project_kwargs={"automatic_checkpoint_naming": False}), "project_kwargs"),
    (dict(project_kwargs={"iteration": 3}), "project_kwargs"),
    (dict(project_kwargs={"total_limit": 3}, num_checkpoint_limit=2), "num_checkpoint_limit"),
    (dict(project_kwargs={"project_dir": "./save"}, run_name="x"), "project_kwargs"),
    (dict(project_kwargs={"nope": 1}), "project_kwargs"),
    (dict(tracker_kwargs={"api_key": "x"}), "tracker_kwargs"),
    (dict(tracker_kwargs={"wandb": "x"}, log_with="wandb"), "tracker_kwargs"),
    (dict(sample_eta=0.0), "sample_eta"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(log_with="nope"), "log_with"),
])
def test_examples_from_the_issue_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        NablaGFlowNetConfig(**overrides)


def test_valid_values_are_accepted_and_normalised(tmp_path):
    import numpy as np

    c = NablaGFlowNetConfig(reward_scale=1000, seed=np.int64(3), flow_block_out_channels=(8, 16), flow_attention_head_dim=4,
                            logdir=tmp_path, save_freq=0, train_max_grad_norm=0, sample_guidance_scale=0, train_adam_beta1=0.0,
                            tracker_kwargs={"tensorboard": {"flush_secs": 5}}, log_with="tensorboard", accelerator_kwargs={"cpu": True},
                            run_name="", exp_name="my-exp 1")
    assert c.reward_scale == 1000.0 and isinstance(c.reward_scale, float)
    assert c.seed == 3 and type(c.seed) is int
    assert c.flow_block_out_channels == [8, 16]
    assert c.logdir == str(tmp_path)
    assert DDPOConfig(lora_alpha=None).lora_alpha is None


def test_tracker_kwargs_without_their_tracker_warn():
    with pytest.warns(UserWarning, match=r"tracker_kwargs\['wandb'\] has no effect"):
        NablaGFlowNetConfig(tracker_kwargs={"wandb": {"entity": "me"}})
    with pytest.warns(UserWarning, match="has no effect"):
        NablaGFlowNetConfig(tracker_kwargs={"wandb": {"entity": "me"}}, log_with="tensorboard")


def test_fields_changed_after_construction_are_checked_by_the_trainer(tmp_path):
    """The trainer validates again: a field set to a bad value after __init__ is still rejected by name."""
    from trl_gfn import DiffusionPipelineForRL, NablaGFlowNetTrainer
    from trl_gfn.testing import BrightnessReward, tiny_stable_diffusion

    c = NablaGFlowNetConfig(logdir=str(tmp_path), run_name="r", flow_block_out_channels=[8, 16], flow_attention_head_dim=4)
    c.use_flow_head = "False"
    with pytest.raises(ValueError, match="^use_flow_head: "):
        NablaGFlowNetTrainer(c, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion()), prompt_function=["a"])


def test_every_field_of_every_config_has_bad_values():
    """The walk above covers every field (a new field with a new kind of annotation must extend this test)."""
    covered = {(c, n) for c, n, _ in CASES}
    assert covered == {(c, f.name) for c in CONFIGS for f in dataclasses.fields(c)}
