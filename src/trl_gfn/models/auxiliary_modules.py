"""TRL's ``trl.models.auxiliary_modules.aesthetic_scorer``, at the same import path, for scripts moving over from TRL.

TRL's AlignProp example builds its reward with ``aesthetic_scorer(hub_model_id, model_filename)``: the LAION
aesthetic head from a Hub file (TRL's own copy, ``trl-lib/ddpo-aesthetic-predictor``) on OpenAI's CLIP ViT-L/14.
Here the same two files become a :class:`~trl_gfn.rewards.AestheticScorer` (differentiable, float32, strict
loading); prefer ``trl_gfn.rewards.load_reward("aesthetic")``, which uses the head from its authors' repository.
"""

from __future__ import annotations

import os

from ..rewards.aesthetic import AestheticScorer

#: TRL's defaults (its example scripts' ``hf_hub_aesthetic_model_id`` / ``hf_hub_aesthetic_model_filename``)
TRL_AESTHETIC_MODEL_ID = "trl-lib/ddpo-aesthetic-predictor"
TRL_AESTHETIC_MODEL_FILENAME = "aesthetic-model.pth"


def aesthetic_scorer(hub_model_id: str = TRL_AESTHETIC_MODEL_ID, model_filename: str = TRL_AESTHETIC_MODEL_FILENAME, *,
                     cache_dir: str | None = None, local_files_only: bool = False) -> AestheticScorer:
    """The aesthetic reward from an MLP head file (``layers.*`` keys) on a Hub repo or in a local folder, and CLIP ViT-L/14.

    Returns the reward module (``reward(images, prompts, metadata) -> (scores, {})``, images in [0, 1]), which is
    what TRL's function returned, differentiable w.r.t. the images. Missing files raise an error naming them.
    """
    from ..rewards.convert import convert_aesthetic
    from ..rewards.official import CLIP_L14_REPO, OfficialFile, fetch_file

    if os.path.isdir(hub_model_id):
        head = os.path.join(hub_model_id, model_filename)
        if not os.path.isfile(head):
            raise FileNotFoundError(f"aesthetic_scorer: no file {head}")
    else:
        head = fetch_file(OfficialFile(hub_model_id, model_filename), cache_dir=cache_dir, local_files_only=local_files_only)
    clip_files = [fetch_file(OfficialFile(CLIP_L14_REPO, name), cache_dir=cache_dir, local_files_only=local_files_only)
                  for name in ("config.json", "model.safetensors")]
    return convert_aesthetic(head, os.path.dirname(clip_files[0]))


__all__ = ["TRL_AESTHETIC_MODEL_FILENAME", "TRL_AESTHETIC_MODEL_ID", "aesthetic_scorer"]
