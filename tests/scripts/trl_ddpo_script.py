"""A DDPO script in the shape of TRL v0.23's ``examples/scripts/ddpo.py``, moved over by changing imports only.

Kept as TRL wrote it: ``HfArgumentParser((ScriptArguments, DDPOConfig))``, the TRL-style ``project_kwargs`` set after
parsing, ``DefaultDDPOStableDiffusionPipeline(model, pretrained_model_revision=..., use_lora=...)``, the trainer built
with TRL's positional order ``(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=...)``, the
image hook reading TRL's per-batch ``[images, prompts, prompt_metadata, rewards, reward_metadata]`` and logging through
the tracker, ``trainer.train()``, ``trainer.save_model(training_args.output_dir)``. Changed besides the imports: the
model default is the bundled digits model and the reward its classifier (TRL's aesthetic scorer downloads CLIP).
"""

from dataclasses import dataclass, field

import numpy as np
from transformers import HfArgumentParser

from trl_gfn import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # was: from trl import ...
from trl_gfn.assets import BUNDLED_DIGIT_CLASSIFIER, BUNDLED_DIGITS_MODEL
from trl_gfn.rewards.digits import DigitClassifierReward


@dataclass
class ScriptArguments:
    pretrained_model: str = field(default=BUNDLED_DIGITS_MODEL, metadata={"help": "Pretrained model to use."})
    pretrained_revision: str = field(default="main", metadata={"help": "Pretrained model revision to use."})
    hf_hub_model_id: str = field(default="ddpo-finetuned-digits", metadata={"help": "HuggingFace repo to save model weights to."})
    use_lora: bool = field(default=True, metadata={"help": "Whether to use LoRA."})


def digit_scorer(model_dir):
    scorer = DigitClassifierReward.from_pretrained(model_dir, target_digits=[0, 8])

    def _fn(images, prompts, metadata):
        scores, _ = scorer(images, prompts, metadata)
        return scores, {"scorer": "digits"}

    return _fn


digits = [f"a handwritten digit {d}" for d in range(10)] + ["a handwritten digit"]


def prompt_fn():
    return np.random.choice(digits), {}


def image_outputs_logger(image_data, global_step, accelerate_logger):
    # as TRL's example: log the last batch of images with their prompts and rewards
    result = {}
    images, prompts, _, rewards, _ = image_data[-1]
    for i, image in enumerate(images):
        prompt = prompts[i]
        reward = rewards[i].item()
        result[f"{prompt:.25} | {reward:.2f}"] = image.unsqueeze(0).float()
    accelerate_logger.log_images(result, step=global_step)


if __name__ == "__main__":
    parser = HfArgumentParser((ScriptArguments, DDPOConfig))
    script_args, training_args = parser.parse_args_into_dataclasses()
    training_args.project_kwargs = {
        "logging_dir": "./logs",
        "automatic_checkpoint_naming": True,
        "total_limit": 5,
        "project_dir": "./save",
    }

    pipeline = DefaultDDPOStableDiffusionPipeline(
        script_args.pretrained_model,
        pretrained_model_revision=script_args.pretrained_revision,
        use_lora=script_args.use_lora,
    )

    trainer = DDPOTrainer(
        training_args,
        digit_scorer(BUNDLED_DIGIT_CLASSIFIER),
        prompt_fn,
        pipeline,
        image_samples_hook=image_outputs_logger,
    )

    trainer.train()

    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
