"""Fine-tune a Stable Diffusion LoRA with DDPO (PPO-clip; TRL's former DDPOTrainer behaviour).

    accelerate launch examples/ddpo.py --num_epochs 1 --sample_num_steps 10 --sample_batch_size 4 \
        --train_batch_size 2 --reward jpeg_compressibility

Defaults: the bundled digits model (`trl_gfn.assets.BUNDLED_DIGITS_MODEL`) and the JPEG-compressibility
reward, so it runs offline on a CPU. Every `DDPOConfig` field is a flag (`--help` lists them); a YAML file
can be given with `--config`. For SD 1.5: `--pretrained_model runwayml/stable-diffusion-v1-5 --reward aesthetic`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import TrlParser

from trl_gfn import DiffusionPipelineForRL
from trl_gfn.configs import DDPOConfig
from trl_gfn.trainers import DDPOTrainer

try:
    from trl_gfn.assets import BUNDLED_DIGITS_MODEL
except ImportError:  # pragma: no cover - a checkout without the bundled model
    BUNDLED_DIGITS_MODEL = None


@dataclass
class ScriptArguments:
    pretrained_model: str | None = field(default=BUNDLED_DIGITS_MODEL, metadata={"help": "Hub id or local directory of a Stable Diffusion 1.x/2.x pipeline (default: the bundled digits model)."})
    pretrained_revision: str | None = field(default=None, metadata={"help": "Revision of the pretrained model on the Hub."})
    reward: str = field(default="jpeg_compressibility", metadata={"help": "jpeg_compressibility | jpeg_incompressibility | digits | brightness | a preset of trl_gfn.rewards (aesthetic, hpsv2, imagereward, pickscore)."})
    reward_model: str | None = field(default=None, metadata={"help": "Hub id or directory of the reward model weights (presets and digits; default: the preset's / bundled classifier)."})
    target_digits: list[int] | None = field(default=None, metadata={"help": "digits reward: the target set S (default: the digit named in each prompt)."})
    prompts: str | None = field(default=None, metadata={"help": "A prompt-set name (trl_gfn.prompts.available_prompt_sets()) or prompts separated by '|' (default: config.prompt_set; digit prompts for the digits model)."})


def build_reward(args: ScriptArguments):
    """The reward named by ``--reward`` (shared by the examples)."""
    name = args.reward
    if name in ("jpeg_compressibility", "jpeg_incompressibility"):
        from trl_gfn.rewards.compressibility import JpegCompressibilityReward

        return JpegCompressibilityReward(incompressibility=name == "jpeg_incompressibility")
    if name == "digits":
        from trl_gfn.assets import BUNDLED_DIGIT_CLASSIFIER
        from trl_gfn.rewards.digits import DigitClassifierReward

        kwargs = {"target_digits": args.target_digits} if args.target_digits else {"prompt_aware": True}
        return DigitClassifierReward.from_pretrained(args.reward_model or BUNDLED_DIGIT_CLASSIFIER, **kwargs)
    if name == "brightness":
        from trl_gfn.testing import BrightnessReward

        return BrightnessReward()
    from trl_gfn.rewards import load_reward

    return load_reward(name, args.reward_model)


def build_prompts(args: ScriptArguments, config):
    if args.prompts:
        return args.prompts.split("|") if "|" in args.prompts else args.prompts
    if args.pretrained_model == BUNDLED_DIGITS_MODEL:
        return "handwritten_digits_by_class"
    return config.prompt_set


def main() -> None:
    parser = TrlParser((ScriptArguments, DDPOConfig))
    args, config = parser.parse_args_and_config()
    if not args.pretrained_model:
        parser.error("--pretrained_model is required")
    pipeline = DiffusionPipelineForRL.from_pretrained(args.pretrained_model, revision=args.pretrained_revision, use_lora=True,
                                                      lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                                                      lora_target_modules=config.lora_target_modules)
    trainer = DDPOTrainer(config, build_reward(args), pipeline, prompt_function=build_prompts(args, config))
    trainer.train()
    trainer.accelerator.print(f"final LoRA and model card in {trainer.output_dir}")


if __name__ == "__main__":
    main()
