"""TRL's pipeline class name, so that scripts written for TRL's former DDPO/AlignProp trainers run by changing imports.

``DefaultDDPOStableDiffusionPipeline(pretrained_model_name, pretrained_model_revision=..., use_lora=True)`` is a
:class:`DiffusionPipelineForRL` built the way TRL built its pipeline: the diffusers pipeline is ``sd_pipeline``,
and a ``pytorch_lora_weights.safetensors`` found in the model folder or repo is loaded (TRL's way of continuing
from a LoRA). TRL then stacked a second, fresh adapter on top of it; here that loaded LoRA is the adapter that is
trained (see :meth:`DiffusionPipelineForRL.ensure_lora`), with the rank and alpha of the trainer's config.
"""

from __future__ import annotations

import logging
import os

from .rl_pipeline import LORA_WEIGHT_NAME, DiffusionPipelineForRL

logger = logging.getLogger(__name__)


class DefaultDDPOStableDiffusionPipeline(DiffusionPipelineForRL):
    """TRL's ``DefaultDDPOStableDiffusionPipeline`` signature on :class:`DiffusionPipelineForRL`.

    Args:
        pretrained_model_name: Hub id or local folder of a Stable Diffusion 1.x/2.x pipeline.
        pretrained_model_revision: its revision on the Hub (TRL's default ``"main"``).
        use_lora: must be True: trl-gfn trains LoRA adapters only (the reference policy is the adapter switched off).

    The LoRA is added by the trainer with the config's ``lora_rank`` / ``lora_alpha`` (TRL fixed rank 4, alpha 4).
    """

    def __init__(self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True):
        if not use_lora:
            raise ValueError("use_lora=False: full fine-tuning is not supported; trl-gfn trains a LoRA adapter and uses the pretrained "
                             "UNet (adapter off) as the reference policy")
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline.from_pretrained(pretrained_model_name, revision=pretrained_model_revision, safety_checker=None,
                                                           requires_safety_checker=False)
        if _has_lora_file(pretrained_model_name, pretrained_model_revision):
            pipeline.load_lora_weights(pretrained_model_name, weight_name=LORA_WEIGHT_NAME, revision=pretrained_model_revision)
            logger.info(f"loaded the LoRA in {pretrained_model_name}; training continues from it")
        super().__init__(pipeline)
        self.use_lora = True
        self.pretrained_model = pretrained_model_name
        self.pretrained_revision = pretrained_model_revision

    @property
    def sd_pipeline(self):
        """The diffusers pipeline (TRL's attribute name)."""
        return self.pipeline

    def set_progress_bar_config(self, *args, **kwargs) -> None:
        self.pipeline.set_progress_bar_config(*args, **kwargs)

    def save_pretrained(self, output_dir: str) -> None:
        """As TRL: the LoRA (diffusers format) and the whole diffusers pipeline into ``output_dir``."""
        self.pipeline.save_pretrained(output_dir)
        if self.has_lora:
            self.save_lora(output_dir)


def _has_lora_file(name: str, revision: str | None) -> bool:
    """Whether the model folder or Hub repo holds ``pytorch_lora_weights.safetensors`` (TRL loaded it if so)."""
    if os.path.isdir(name):
        return os.path.isfile(os.path.join(name, LORA_WEIGHT_NAME))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        hf_hub_download(name, LORA_WEIGHT_NAME, revision=revision)
        return True
    except LocalEntryNotFoundError:
        logger.warning(f"offline: cannot tell whether {name} holds {LORA_WEIGHT_NAME}; none is loaded")
        return False
    except EntryNotFoundError:
        return False


__all__ = ["DefaultDDPOStableDiffusionPipeline"]
