"""What a trainer publishes: the final folder (LoRA, extra modules, public config, model card) and the Hub upload.

A mixin of :class:`~trl_gfn.trainers.base.BaseDiffusionTrainer`, kept apart from the training loop: it reads the
trainer's config, pipeline, reward (or preference data) and metrics and writes nothing but the files of :meth:`final_files`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

from .hub import base_model_hub_id, base_model_license, build_model_card, public_model_name, upload_files


class PublishingMixin:
    """``save_pretrained`` / ``save_model``, ``create_model_card`` and ``push_to_hub`` of the trainers."""

    #: the method's tag in model cards (default: ``method_name`` in lower case with dashes)
    method_tag: str = ""

    def final_files(self) -> list[str]:
        """The files :meth:`save_pretrained` writes and :meth:`push_to_hub` uploads (nothing else in the folder is uploaded)."""
        return ["README.md", "training_config.json", *self.output_files()]

    def save_pretrained(self, output_dir: str | None = None) -> str:
        """Write the final LoRA (diffusers format), extra modules, the public config and a model card (main process)."""
        output_dir = output_dir or self.output_dir
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.save_trained_weights(output_dir)
            with open(os.path.join(output_dir, "training_config.json"), "w", encoding="utf-8") as f:
                json.dump(self.config.to_public_dict(), f, indent=2, default=str)
            with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(self.create_model_card(repo_id=self.config.hub_model_id or "<this folder, or its Hub repo id>"))
        self.accelerator.wait_for_everyone()
        return output_dir

    def save_model(self, output_dir: str | None = None) -> str:
        """TRL's name for :meth:`save_pretrained` (its example scripts end with ``trainer.save_model(output_dir)``)."""
        return self.save_pretrained(output_dir)

    def model_card_extra_usage(self, repo_id: str = "<repo_id>") -> str:
        """Extra text under the card's usage example (Nabla-GFlowNet: where its flow head is; PPD: how to load the user layers)."""
        return ""

    def note_prompts(self, prompts: Sequence[str]) -> None:
        """Remember the first distinct prompts trained on (the model card's usage example and list use them)."""
        seen = self.card_prompts
        for p in prompts:
            if len(seen) >= 4:
                break
            if p not in seen:
                seen.append(p)

    def card_prompt_examples(self) -> list[str]:
        """The prompts the card shows: those trained on, else the first of a list or named prompt set."""
        seen = list(self.card_prompts)
        if not seen and self.prompt_source.prompts:
            seen = list(dict.fromkeys(self.prompt_source.prompts))[:4]
        return seen

    def card_reward_name(self) -> str:
        """How the card names what the model was trained for: the reward's ``name``, class or function name."""
        reward = getattr(self.reward_fn, "name", None) or type(self.reward_fn).__name__
        if reward == "function":
            reward = getattr(self.reward_fn, "__name__", "custom reward")
        return reward

    def card_objective(self) -> str | None:
        """The card's "trained ... <objective> while staying close to the pretrained model" (None: maximise the reward)."""
        return None

    def create_model_card(self, repo_id: str = "<repo_id>", dataset_name: str | None = None, tags: list[str] | None = None) -> str:
        """The model card (``huggingface_hub.ModelCard`` text): Hub metadata (base model id, its license, ``text-to-image``,
        ``diffusers``, tags for the method and trl-gfn), method and paper, reward, key config values, final metrics, and
        loading code that uses one of the run's own prompts. ``dataset_name`` and ``tags`` (TRL's arguments) go to the metadata."""
        reward = self.card_reward_name()
        metrics = {k: v for k, v in self.last_metrics.items() if not k.startswith("lr/")}
        name_or_path = self.pipeline.name_or_path
        hub_id = base_model_hub_id(name_or_path)
        tag = self.method_tag or re.sub(r"[^a-z0-9]+", "-", self.method_name.lower()).strip("-")
        card = build_model_card(repo_id=repo_id, base_model=public_model_name(name_or_path), base_model_id=hub_id,
                                license=base_model_license(name_or_path, hub_id), method=self.method_name, method_tag=tag, paper=self.paper,
                                citation=self.citation, reward=reward, config=self.config.to_public_dict(), key_fields=self.card_fields,
                                metrics=metrics, prompts=self.card_prompt_examples(), extra_usage=self.model_card_extra_usage(repo_id),
                                dataset_name=dataset_name, tags=list(tags) if isinstance(tags, (list, tuple)) else ([tags] if tags else None),
                                objective=self.card_objective(), pipeline_class=self.pipeline.family.pipeline_class.__name__)
        return str(card)

    def push_to_hub(self, repo_id: str | None = None, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload trl-gfn LoRA", dataset_name: str | None = None, tags: list[str] | None = None) -> Any:
        """Save the final weights and model card and upload exactly :meth:`final_files` to ``repo_id`` (default ``config.hub_model_id``)."""
        repo_id = repo_id or self.config.hub_model_id
        if not repo_id:
            raise ValueError("push_to_hub: repo_id must be a non-empty Hub repository id such as 'me/my-lora' (or set hub_model_id)")
        folder = self.output_dir
        self.save_pretrained(folder)
        if self.accelerator.is_main_process:
            with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
                f.write(self.create_model_card(repo_id=repo_id, dataset_name=dataset_name, tags=tags))
            return upload_files(folder, self.final_files(), repo_id, private=private, token=token, commit_message=commit_message)
        return None


__all__ = ["PublishingMixin"]
