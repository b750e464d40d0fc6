"""The example scripts run end to end through their CLI (TrlParser flags and YAML), and the docs match the code."""

import os
import subprocess
import sys

import pytest
import yaml

from trl_gfn.testing import tiny_stable_diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_stable_diffusion().save_pretrained(path)
    return str(path)


def run_example(script, args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_nabla_gfn_example_with_yaml_and_flags(tmp_path, tiny_model_dir):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"num_epochs": 1, "sample_num_steps": 4, "sample_batch_size": 2, "train_batch_size": 2,
                                      "flow_block_out_channels": [8, 16], "flow_attention_head_dim": 4, "reward_scale": 100.0}))
    run_example("nabla_gfn.py", ["--config", str(config), "--pretrained_model", tiny_model_dir, "--reward", "brightness",
                                 "--prompts", "a cat|a dog", "--logdir", str(tmp_path / "logs"), "--run_name", "ex",
                                 "--lora_rank", "4", "--log_with", "tensorboard"], cwd=tmp_path)
    final = tmp_path / "logs" / "ex" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file() and (final / "flow_head" / "config.json").is_file()
    import json

    saved = json.loads((final / "training_config.json").read_text())
    assert saved["reward_scale"] == 100.0 and saved["lora_rank"] == 4 and saved["num_epochs"] == 1
    assert "Nabla-GFlowNet" in (final / "README.md").read_text()
    # tracker events, and the image grid with prompts and rewards
    run = tmp_path / "logs" / "ex"
    assert any(p.name.startswith("events.out.tfevents") for p in run.rglob("*"))
    assert (run / "samples" / "epoch_0000.png").is_file()
    captions = (run / "samples" / "epoch_0000.txt").read_text().splitlines()
    assert len(captions) == 4 and all(" | " in c for c in captions)  # 2 batches of 2 samples


def test_reward_preset_fills_fields_left_at_defaults():
    from trl_gfn import NablaGFlowNetConfig
    from trl_gfn.cli import ScriptArguments, apply_reward_preset, build_prompts

    config = NablaGFlowNetConfig(unet_reg_scale=7.0)
    args = ScriptArguments(reward="aesthetic")
    changed = apply_reward_preset(args, config)
    assert config.reward_scale == 1e4 and config.unet_reg_scale == 7.0 and config.flow_condition_on_prompt is False
    assert set(changed) == {"reward_scale", "flow_condition_on_prompt"}
    assert build_prompts(args, config) == "simple_animals"


def test_prompts_on_the_command_line_are_a_set_name_one_prompt_or_a_list():
    from trl_gfn import NablaGFlowNetConfig
    from trl_gfn.cli import ScriptArguments, build_prompts
    from trl_gfn.prompts import PromptSource

    config = NablaGFlowNetConfig()
    assert build_prompts(ScriptArguments(prompts="simple_animals"), config) == "simple_animals"
    assert build_prompts(ScriptArguments(prompts="a photo of a cat"), config) == ["a photo of a cat"]
    assert build_prompts(ScriptArguments(prompts="a cat|a dog|"), config) == ["a cat", "a dog"]
    # in Python a bare string is a set name; anything else is named as a prompt, with the fix
    with pytest.raises(ValueError, match=r"^prompts .*'a photo of a cat' is not a prompt-set name.*\['a photo of a cat'\]"):
        PromptSource("a photo of a cat")


def test_config_tables_in_docs_are_up_to_date():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "config_docs.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_public_config_field_is_documented():
    import dataclasses

    import trl_gfn.configs as configs

    for name in configs.__all__:
        for f in dataclasses.fields(getattr(configs, name)):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


@pytest.mark.parametrize("script", ["nabla_gfn.py", "ddpo.py", "draft.py", "refl.py", "alignprop.py"])
def test_example_help_lists_every_config_field(script, tmp_path):
    result = run_example(script, ["--help"], cwd=tmp_path)
    for flag in ("--sample_num_steps", "--train_learning_rate", "--reward", "--pretrained_model", "--resume_from", "--init_from", "--config"):
        assert flag in result.stdout, (script, flag)


def test_examples_without_flags_are_cpu_sized_on_the_bundled_model():
    """No flags: the bundled digits model with the digits YAML (Nabla-GFlowNet) or the shared CPU-sized defaults, a reward
    with something to learn (target digits {0, 8}); flags and --config still override; another model keeps the SD defaults."""
    from trl_gfn import DDPOConfig, NablaGFlowNetConfig
    from trl_gfn.cli import BUNDLED_MODEL_DEFAULTS, parse

    digits_yaml = os.path.join(ROOT, "examples", "configs", "nabla_gfn_digits.yaml")
    with open(os.path.join(ROOT, "examples", "nabla_gfn.py"), encoding="utf-8") as f:
        assert "bundled_defaults=DIGITS_CONFIG" in f.read()
    with open(digits_yaml, encoding="utf-8") as f:
        expected = yaml.safe_load(f)
    args, config, applied = parse(NablaGFlowNetConfig, [], digits_yaml)
    assert applied == expected and args.reward == "digits" and args.target_digits == [0, 8]
    for key in ("num_epochs", "sample_num_steps", "sample_batch_size", "train_batch_size", "reward_scale", "flow_block_out_channels"):
        assert getattr(config, key) == expected[key], key
    assert config.num_epochs * config.sample_num_steps <= 500  # versus 100 x 50 with the config's SD defaults
    assert parse(NablaGFlowNetConfig, ["--num_epochs", "2"], digits_yaml)[1].num_epochs == 2
    args, config, applied = parse(DDPOConfig, [])
    assert applied == BUNDLED_MODEL_DEFAULTS and config.num_epochs == 10 and args.target_digits == [0, 8]
    args, config, applied = parse(DDPOConfig, ["--pretrained_model", "stable-diffusion-v1-5/stable-diffusion-v1-5"])
    assert applied == {} and config.num_epochs == 100 and args.target_digits is None


def test_every_trainer_config_has_a_table_in_the_docs():
    import pathlib

    import trl_gfn.configs as configs

    text = "".join(p.read_text(encoding="utf-8") for p in pathlib.Path(ROOT, "docs").glob("*.md"))
    for name in configs.__all__:
        if name not in ("BaseDiffusionConfig", "DiffusionRLConfig"):  # shared bases, documented through their trainers
            assert f"<!-- config-table: {name} -->" in text, f"{name} has no config table in docs/"


def test_diffusion_dpo_example_on_the_bundled_pairs_with_yaml_and_flags(tmp_path):
    """No --dataset / --pretrained_model: the bundled digits model and preference pairs; flags and --config apply."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"num_epochs": 1, "train_batch_size": 4, "lora_rank": 2}))
    result = run_example("diffusion_dpo.py", ["--help"], cwd=tmp_path)
    for flag in ("--loss_type", "--beta", "--dmpo_alpha", "--see_gamma", "--adaptive_rho", "--dataset", "--tie_handling",
                 "--invalid_rows", "--resume_from", "--config"):
        assert flag in result.stdout, flag
    result = run_example("diffusion_dpo.py", ["--config", str(config), "--loss_type", "dmpo", "--max_train_pairs", "24",
                                              "--eval_split", "", "--logdir", str(tmp_path / "logs"), "--run_name", "ex"], cwd=tmp_path)
    final = tmp_path / "logs" / "ex" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert "DMPO" in (final / "README.md").read_text()
    assert "ties dropped" in result.stdout


def test_inversion_dpo_example_on_the_bundled_pairs(tmp_path):
    result = run_example("inversion_dpo.py", ["--help"], cwd=tmp_path)
    for flag in ("--inversion_num_steps", "--inversion_guidance_scale", "--inversion_train_steps", "--inversion_sign", "--loss_type",
                 "--dataset", "--resume_from", "--config"):
        assert flag in result.stdout, flag
    run_example("inversion_dpo.py", ["--num_epochs", "1", "--train_batch_size", "4", "--lora_rank", "2", "--max_train_pairs", "16",
                                     "--inversion_num_steps", "4", "--inversion_train_steps", "2", "--eval_split", "",
                                     "--logdir", str(tmp_path / "logs"), "--run_name", "ex"], cwd=tmp_path)
    final = tmp_path / "logs" / "ex" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert "Inversion-DPO" in (final / "README.md").read_text()


def test_spin_diffusion_example_on_the_bundled_pairs(tmp_path):
    result = run_example("spin_diffusion.py", ["--help"], cwd=tmp_path)
    for flag in ("--spin_num_iterations", "--spin_epochs_per_iteration", "--spin_samples_per_prompt", "--sample_num_steps", "--dataset"):
        assert flag in result.stdout, flag
    run_example("spin_diffusion.py", ["--num_epochs", "2", "--spin_num_iterations", "2", "--train_batch_size", "4", "--lora_rank", "2",
                                      "--max_train_pairs", "12", "--sample_num_steps", "3", "--eval_split", "",
                                      "--logdir", str(tmp_path / "logs"), "--run_name", "ex"], cwd=tmp_path)
    final = tmp_path / "logs" / "ex" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert "SPIN-Diffusion" in (final / "README.md").read_text()


def test_ppd_example_on_the_bundled_pairs_relabelled_for_simulated_users(tmp_path):
    result = run_example("ppd.py", ["--help"], cwd=tmp_path)
    for flag in ("--ppd_context_pairs", "--ppd_embedding_provider", "--ppd_num_tokens", "--ppd_learning_rate", "--dataset"):
        assert flag in result.stdout, flag
    run_example("ppd.py", ["--num_epochs", "1", "--train_batch_size", "4", "--lora_rank", "2", "--max_train_pairs", "40",
                           "--eval_split", "", "--logdir", str(tmp_path / "logs"), "--run_name", "ex"], cwd=tmp_path)
    final = tmp_path / "logs" / "ex" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file() and (final / "user_attention" / "config.json").is_file()
    assert (final / "user_embeddings.safetensors").is_file() and "PPD" in (final / "README.md").read_text()


def test_a_dataset_folder_without_the_eval_split_warns_at_the_default_and_is_an_error_when_named(tmp_path):
    from trl_gfn.cli import run_preference
    from trl_gfn.data.digits_preferences import load_digits_preferences

    folder = tmp_path / "pairs"
    folder.mkdir()
    load_digits_preferences("train").select(range(8)).to_parquet(str(folder / "train.parquet"))
    common = ["--dataset", str(folder), "--logdir", str(tmp_path / "logs"), "--run_name", "r", "--save_freq", "0", "--num_epochs", "1",
              "--train_batch_size", "4", "--lr_warmup_steps", "0"]
    with pytest.raises(ValueError, match=r"^eval_split: .* has no split 'test'.*--eval_split ''"):
        run_preference(common + ["--eval_split", "test"])
    with pytest.warns(UserWarning, match=r"eval_split: .* has no 'validation' split, so this run evaluates nothing"):
        trainer = run_preference(common)
    assert trainer.state.global_step >= 1 and trainer.eval_pairs is None
