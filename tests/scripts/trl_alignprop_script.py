"""An AlignProp script in the shape of TRL v0.23's ``examples/scripts/alignprop.py``, moved over by changing imports only.

As TRL wrote it: ``HfArgumentParser((ScriptArguments, AlignPropConfig))`` (TRL's defaults, e.g.
``truncated_rand_backprop_minmax`` up to ``sample_num_steps``, and ``train_batch_size > 1`` meaning samples per
micro-batch), TRL-style ``project_kwargs``, ``DefaultDDPOStableDiffusionPipeline``, TRL's positional order, the hook
reading TRL's ``{"images", "prompts", "rewards"}`` dict, ``train()``, ``save_model``. ``aesthetic_scorer`` is imported
from where TRL had it; the reward used is the bundled digit classifier (the aesthetic scorer downloads CLIP).
"""

from dataclasses import dataclass, field

import numpy as np
from transformers import HfArgumentParser

from trl_gfn import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline  # was: from trl import ...
from trl_gfn.assets import BUNDLED_DIGIT_CLASSIFIER, BUNDLED_DIGITS_MODEL
from trl_gfn.models.auxiliary_modules import aesthetic_scorer  # noqa: F401 - was: from trl.models.auxiliary_modules import ...
from trl_gfn.rewards.digits import DigitClassifierReward


@dataclass
class ScriptArguments:
    pretrained_model: str = field(default=BUNDLED_DIGITS_MODEL, metadata={"help": "Pretrained model to use."})
    pretrained_revision: str = field(default="main", metadata={"help": "Pretrained model revision to use."})
    hf_hub_model_id: str = field(default="alignprop-finetuned-digits", metadata={"help": "HuggingFace repo to save model weights to."})
    use_lora: bool = field(default=True, metadata={"help": "Whether to use LoRA."})


def digit_scorer(model_dir):
    scorer = DigitClassifierReward.from_pretrained(model_dir, target_digits=[0, 8])

    def _fn(images, prompts, metadata):
        return scorer(images.clamp(0, 1), prompts, metadata)[0], {}

    return _fn


digits = [f"a handwritten digit {d}" for d in range(10)] + ["a handwritten digit"]


def prompt_fn():
    return np.random.choice(digits), {}


def image_outputs_logger(image_pair_data, global_step, accelerate_logger):
    # as TRL's example: log a few images of the last micro-batch with their prompts
    result = {}
    images, prompts, _ = [image_pair_data["images"], image_pair_data["prompts"], image_pair_data["rewards"]]
    for i, image in enumerate(images[:4]):
        prompt = prompts[i]
        result[f"{prompt}"] = image.unsqueeze(0).float()
    accelerate_logger.log_images(result, step=global_step)


if __name__ == "__main__":
    parser = HfArgumentParser((ScriptArguments, AlignPropConfig))
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

    trainer = AlignPropTrainer(
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
