"""Prompt sets and the prompt source of the trainers."""

from .registry import HUB_PROMPT_SETS, PromptSource, available_prompt_sets, load_prompt_set

__all__ = ["HUB_PROMPT_SETS", "PromptSource", "available_prompt_sets", "load_prompt_set"]
