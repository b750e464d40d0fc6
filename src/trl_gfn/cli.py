"""What the example scripts share: their script arguments, reward and prompt choice, pipeline loading.

Every example is ``TrlParser((ScriptArguments, <Method>Config))`` + :func:`run`, so that
``accelerate launch examples/<method>.py --config my.yaml --reward aesthetic ...`` behaves the same for
every method. Defaults run offline on a CPU in minutes: on the bundled digits model the example's
CPU-sized defaults (:data:`BUNDLED_MODEL_DEFAULTS`, or the YAML an example names) replace the configs'
Stable Diffusion defaults, and the classifier reward r = log p(digit in {0, 8}) leaves something to learn.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

from .assets import BUNDLED_DIGIT_CLASSIFIER, BUNDLED_DIGITS_MODEL, BUNDLED_DIGITS_PREFERENCES
from .pipelines import DiffusionPipelineForRL

#: rewards the examples know besides the Hub presets of ``trl_gfn.rewards.REWARD_PRESETS``
LOCAL_REWARDS = ("digits", "jpeg_compressibility", "jpeg_incompressibility", "brightness")
#: defaults of the examples on the bundled digits model (flags and --config override them): 10 epochs of 32 samples x 20 steps
BUNDLED_MODEL_DEFAULTS: dict[str, Any] = dict(num_epochs=10, sample_num_steps=20, sample_guidance_scale=2.0, sample_batch_size=16,
                                              sample_num_batches_per_epoch=2, train_batch_size=8, save_freq=5, target_digits=[0, 8])
CONFIG_HELP = ("YAML file of flag values (any field below, e.g. examples/configs/nabla_gfn_digits.yaml); flags given on the command "
               "line override it")


@dataclass
class ScriptArguments:
    """Arguments of the example scripts that are not trainer config fields."""

    pretrained_model: str = field(default=BUNDLED_DIGITS_MODEL, metadata={"help": "Hub id or local directory of a Stable Diffusion 1.x/2.x or SDXL pipeline, the family read from its model_index.json (default: the bundled digits model)."})
    pretrained_revision: str | None = field(default=None, metadata={"help": "Revision of the pretrained model on the Hub."})
    pretrained_vae: str | None = field(default=None, metadata={"help": "Hub id or local directory of a VAE (AutoencoderKL) replacing the model's own, e.g. madebyollin/sdxl-vae-fp16-fix to run SDXL's VAE in float16 (default: the model's VAE)."})
    height: int | None = field(default=None, metadata={"help": "Height in pixels of the sampled images; give width too (default: the UNet's sample size, e.g. 1024 for SDXL)."})
    width: int | None = field(default=None, metadata={"help": "Width in pixels of the sampled images; give height too (non-square sizes work)."})
    reward: str = field(default="digits", metadata={"help": "digits | jpeg_compressibility | jpeg_incompressibility | brightness | a reward from its official checkpoint (downloaded and converted on first use): aesthetic, hpsv2, hpsv2.1, imagereward, pickscore."})
    reward_model: str | None = field(default=None, metadata={"help": "Directory or Hub id of already converted reward weights (default: the official checkpoint, converted and cached; for digits the bundled classifier)."})
    target_digits: list[int] | None = field(default=None, metadata={"help": "digits reward: the target set S of r = log p(y in S | x) (default: the digit named in each prompt)."})
    prompts: str | None = field(default=None, metadata={"help": "A prompt-set name (trl_gfn.prompts.available_prompt_sets()), one prompt, or prompts separated by '|' (default: the preset's set, or config.prompt_set; digit prompts for the bundled model)."})
    apply_reward_preset: bool = field(default=True, metadata={"help": "Fill config fields left at their defaults from the reward's preset (reward_scale, unet_reg_scale, flow_condition_on_prompt)."})


def build_reward(args: ScriptArguments):
    """The reward module named by ``args.reward``."""
    name = args.reward
    if name in ("jpeg_compressibility", "jpeg_incompressibility"):
        from .rewards.compressibility import JpegCompressibilityReward

        return JpegCompressibilityReward(incompressibility=name == "jpeg_incompressibility")
    if name == "digits":
        from .rewards.digits import DigitClassifierReward

        kwargs = {"target_digits": args.target_digits} if args.target_digits else {"prompt_aware": True}
        return DigitClassifierReward.from_pretrained(args.reward_model or BUNDLED_DIGIT_CLASSIFIER, **kwargs)
    if name == "brightness":
        from .testing import BrightnessReward

        return BrightnessReward()
    from .rewards import load_reward

    return load_reward(name, args.reward_model)


def build_prompts(args: ScriptArguments, config) -> Any:
    """Prompt source for the trainer: explicit prompts, the reward preset's set, digit prompts, or config.prompt_set."""
    if args.prompts:
        from .prompts import available_prompt_sets

        if "|" in args.prompts:
            return [p for p in args.prompts.split("|") if p.strip()]
        return args.prompts if args.prompts in available_prompt_sets() else [args.prompts]  # one prompt, not a set name
    from .rewards import REWARD_PRESETS

    if args.reward in REWARD_PRESETS and config.prompt_set == _default(config, "prompt_set"):
        return REWARD_PRESETS[args.reward]["prompts"]
    if args.pretrained_model == BUNDLED_DIGITS_MODEL and config.prompt_set == _default(config, "prompt_set"):
        return "handwritten_digit" if args.target_digits else "handwritten_digits_by_class"
    return config.prompt_set


def apply_reward_preset(args: ScriptArguments, config) -> list[str]:
    """Set the preset's values on config fields still at their defaults; returns the names of the fields set."""
    from .rewards import REWARD_PRESETS

    if not args.apply_reward_preset or args.reward not in REWARD_PRESETS:
        return []
    preset = REWARD_PRESETS[args.reward]
    values = {"reward_scale": preset["reward_scale"], "unet_reg_scale": preset["unet_reg_scale"],
              "flow_condition_on_prompt": preset["flow_head_uses_prompt"]}
    changed = []
    for name, value in values.items():
        if hasattr(config, name) and getattr(config, name) == _default(config, name) and value != getattr(config, name):
            setattr(config, name, value)
            changed.append(name)
    config.validate()
    return changed


def load_pipeline(args: ScriptArguments, config) -> DiffusionPipelineForRL:
    """The pipeline with the LoRA adapter the config asks for."""
    kwargs = {}
    if getattr(args, "pretrained_vae", None):
        from diffusers import AutoencoderKL

        kwargs["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae)
    return DiffusionPipelineForRL.from_pretrained(args.pretrained_model, revision=args.pretrained_revision, use_lora=True,
                                                  lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                                                  lora_target_modules=config.lora_target_modules, height=getattr(args, "height", None),
                                                  width=getattr(args, "width", None), **kwargs)


def build_parser(config_class, defaults: dict[str, Any] | None = None, script_class: type | None = None):
    """TRL's parser over ``script_class`` (default :class:`ScriptArguments`) + ``config_class``, with ``--config`` listed in
    ``--help`` and ``defaults`` set."""
    from trl import TrlParser

    script_class = script_class or ScriptArguments
    parser = TrlParser((script_class, config_class))
    parser.add_argument("--config", metavar="FILE.yaml", default=None, help=CONFIG_HELP)  # TrlParser reads it before parsing
    if defaults:
        unknown = parser.set_defaults_with_config(**defaults)
        if unknown:
            raise ValueError(f"example defaults: {unknown[::2]} are not fields of {script_class.__name__} or {config_class.__name__}")
    return parser


def parse(config_class, argv: list[str] | None = None, bundled_defaults: dict[str, Any] | str | os.PathLike | None = None):
    """``(script arguments, config)`` from flags and ``--config``; on the bundled digits model ``bundled_defaults`` (a dict or a
    YAML file, default :data:`BUNDLED_MODEL_DEFAULTS`) replace the dataclass defaults. Returns also the defaults applied."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config = build_parser(config_class).parse_args_and_config(args=argv)[:2]
    if args.pretrained_model != BUNDLED_DIGITS_MODEL:
        return args, config, {}
    defaults = bundled_defaults if bundled_defaults is not None else BUNDLED_MODEL_DEFAULTS
    if not isinstance(defaults, dict):
        import yaml

        with open(defaults, encoding="utf-8") as f:
            defaults = yaml.safe_load(f)
    args, config = build_parser(config_class, defaults).parse_args_and_config(args=argv)[:2]
    return args, config, defaults


def run(trainer_class, config_class, argv: list[str] | None = None, bundled_defaults: dict[str, Any] | str | os.PathLike | None = None):
    """Parse ``ScriptArguments`` + ``config_class`` with TRL's parser (flags and ``--config file.yaml``), train, save.

    On the bundled digits model, ``bundled_defaults`` (see :func:`parse`) make a run without flags CPU-sized.
    """
    args, config, defaults = parse(config_class, argv, bundled_defaults)
    if defaults:
        shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
        print(f"bundled digits model: defaults {shown} (flags and --config override them)", flush=True)
    changed = apply_reward_preset(args, config)
    trainer = trainer_class(config, build_reward(args), load_pipeline(args, config), prompt_function=build_prompts(args, config))
    if changed:
        trainer.accelerator.print(f"reward preset {args.reward!r} set: " + ", ".join(f"{k}={getattr(config, k)}" for k in changed))
    trainer.train()
    trainer.accelerator.print(f"final LoRA, model card and config in {trainer.output_dir}")
    return trainer


# ------------------------------------------------------------------------------------------------ preference examples
@dataclass
class PreferenceScriptArguments:
    """Arguments of the preference example (``examples/diffusion_dpo.py``) that are not trainer config fields."""

    pretrained_model: str = field(default=BUNDLED_DIGITS_MODEL, metadata={"help": "Hub id or local directory of a Stable Diffusion 1.x/2.x pipeline (default: the bundled digits model)."})
    pretrained_revision: str | None = field(default=None, metadata={"help": "Revision of the pretrained model on the Hub."})
    dataset: str = field(default=BUNDLED_DIGITS_PREFERENCES, metadata={"help": "Preference pairs in the Pick-a-Pic layout: a folder of <split>.parquet files (default: the bundled digits preferences), a folder written by datasets' save_to_disk, a .parquet file, or a Hub dataset id such as yuvalkirstain/pickapic_v2 (downloaded by datasets)."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default="validation", metadata={"help": "Split to evaluate on every eval_freq epochs (loss, implicit accuracy); empty or None: no evaluation."})
    max_train_pairs: int | None = field(default=None, metadata={"help": "Train on the first this many rows of the split only (like diffusers' --max_train_samples)."})
    minority_fraction: float | None = field(default=None, metadata={"help": "Bundled digits preferences only: relabel them with this share of minority (flipped) labels, in [0, 0.5) (default: as shipped, 0.1)."})


def load_preference_split(dataset: str, split: str, minority_fraction: float | None = None):
    """A split of the preference data named by ``--dataset`` (see :class:`PreferenceScriptArguments`); None if a local source lacks it."""
    import datasets

    from .data.digits_preferences import load_digits_preferences

    if os.path.abspath(dataset) == os.path.abspath(BUNDLED_DIGITS_PREFERENCES):
        return load_digits_preferences(split, minority_fraction=minority_fraction)
    if minority_fraction is not None:
        raise ValueError(f"minority_fraction: relabels the bundled digits preferences only, not {dataset!r}")
    if os.path.isfile(dataset):
        if not dataset.endswith(".parquet"):
            raise ValueError(f"dataset: {dataset} is a file but not a .parquet file")
        return _read_parquet(dataset) if split == "train" else None
    if os.path.isdir(dataset):
        file = os.path.join(dataset, f"{split}.parquet")
        if os.path.isfile(file):
            return _read_parquet(file)
        if os.path.isfile(os.path.join(dataset, "dataset_dict.json")) or os.path.isfile(os.path.join(dataset, "dataset_info.json")):
            loaded = datasets.load_from_disk(dataset)
            if isinstance(loaded, datasets.DatasetDict):
                return loaded[split] if split in loaded else None
            return loaded if split == "train" else None
        if any(name.endswith(".parquet") for name in os.listdir(dataset)):
            return None  # a folder of split files without this one
        raise ValueError(f"dataset: {dataset} holds neither {split}.parquet nor a dataset written by save_to_disk")
    return datasets.load_dataset(dataset, split=split)  # a Hub dataset


def _read_parquet(path: str):
    import datasets
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(pq.read_table(path)))


def run_preference(argv: list[str] | None = None, config_class: type | None = None, trainer_class: type | None = None,
                   personalized: bool = False):
    """The preference examples: parse :class:`PreferenceScriptArguments` + the config (``DiffusionDPOConfig`` by default; flags
    and ``--config``), load the pipeline and the pairs, train with the trainer (:class:`~trl_gfn.DiffusionDPOTrainer` by default,
    e.g. :class:`~trl_gfn.InversionDPOTrainer` with ``InversionDPOConfig``), save. Without flags: the bundled model and data;
    ``personalized``: the bundled pairs (when ``--dataset`` is the bundled data) are relabelled for the seen simulated users of :mod:`trl_gfn.data.personalized` (PPD)."""
    from .configs.dpo import DiffusionDPOConfig
    from .trainers.diffusion_dpo import DiffusionDPOTrainer

    config_class = config_class or DiffusionDPOConfig
    trainer_class = trainer_class or DiffusionDPOTrainer
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config = build_parser(config_class, script_class=PreferenceScriptArguments).parse_args_and_config(args=argv)[:2]
    train = load_preference_split(args.dataset, args.dataset_split, args.minority_fraction)
    if train is None:
        raise ValueError(f"dataset: {args.dataset} has no split {args.dataset_split!r}")
    evaluation = load_preference_split(args.dataset, args.eval_split, args.minority_fraction) if args.eval_split else None
    if args.eval_split and evaluation is None:
        if args.eval_split != _default(args, "eval_split"):  # asked for by name: not silently skipped
            raise ValueError(f"eval_split: {args.dataset} has no split {args.eval_split!r}; name one it has, or pass --eval_split '' "
                             "for no evaluation")
        warnings.warn(f"eval_split: {args.dataset} has no {args.eval_split!r} split, so this run evaluates nothing "
                      "(pass --eval_split '' to say so, or --eval_split <split> to evaluate on another split)", stacklevel=2)
    if personalized and os.path.abspath(args.dataset) == os.path.abspath(BUNDLED_DIGITS_PREFERENCES):
        from .data.personalized import SEEN_USERS, personalized_preferences

        train = personalized_preferences(train).filter(lambda r: r["user_id"] in SEEN_USERS)
        evaluation = personalized_preferences(evaluation) if evaluation is not None else None
    if args.max_train_pairs:
        train = train.select(range(min(args.max_train_pairs, len(train))))
    trainer = trainer_class(config, load_pipeline(args, config), train, evaluation)
    report = trainer.train_pairs.report
    trainer.accelerator.print(f"{trainer.method_name}: {report.pairs} training pairs ({report.ties_dropped} ties dropped, {report.invalid_skipped} "
                              f"invalid rows skipped), beta {trainer.beta:g}")
    trainer.train()
    trainer.accelerator.print(f"final LoRA, model card and config in {trainer.output_dir}")
    return trainer


def _default(config, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(config)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None
