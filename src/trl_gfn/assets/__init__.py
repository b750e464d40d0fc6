"""Models bundled with trl-gfn (built on the CPU by the scripts in ``scripts/``, see docs/bundled_model.md).

- :data:`BUNDLED_DIGITS_MODEL`: a tiny text-to-image ``StableDiffusionPipeline`` directory trained on the
  UCI handwritten digits (16x16 RGB images; prompts ``"a handwritten digit 3"`` and the generic
  ``"a handwritten digit"``). Load it like any diffusers model:
  ``StableDiffusionPipeline.from_pretrained(BUNDLED_DIGITS_MODEL)``.
- :data:`BUNDLED_DIGIT_CLASSIFIER`: the CNN digit classifier trained on the same data, loadable with
  ``trl_gfn.rewards.digits.DigitClassifier.from_pretrained`` or as a reward with
  ``DigitClassifierReward.from_pretrained(BUNDLED_DIGIT_CLASSIFIER, target_digits=[0, 8])``.
- :data:`BUNDLED_DIGIT_JUDGE`: a second digit classifier (another split, initialisation and width), never a reward:
  the digits benchmark's independent judge of the classes (``trl_gfn.evaluation.judges``).

- :data:`BUNDLED_DIGITS_PREFERENCES`: preference pairs (Pick-a-Pic layout) sampled from the digits model and labelled by
  simulated annotators who prefer round digits (``scripts/make_digits_preferences.py``, docs/preference.md).

All are plain path strings (the directories ship as package data).
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: path of the bundled digits ``StableDiffusionPipeline`` directory
BUNDLED_DIGITS_MODEL: str = str(_HERE / "digits-sd")
#: path of the bundled digit classifier (``DigitClassifier`` / ``DigitClassifierReward`` checkpoint)
BUNDLED_DIGIT_CLASSIFIER: str = str(_HERE / "digit-classifier")
#: path of the digits benchmark's independent judge (a ``DigitClassifier`` checkpoint; scripts/train_digit_classifier.py
#: --seed 2 --width 32 --feature_dim 128): it counts classes and never gives a reward, so nothing is optimised against it
BUNDLED_DIGIT_JUDGE: str = str(_HERE / "digit-judge")
#: folder of the bundled preference data (``train.parquet``, ``validation.parquet``): pairs of the digits model labelled by
#: simulated annotators (``trl_gfn.data.digits_preferences``; load with ``load_digits_preferences``)
BUNDLED_DIGITS_PREFERENCES: str = str(_HERE / "digits-preferences")
#: the user-embedding provider of PPD for the digits model (``trl_gfn.models.user_encoder.DigitsUserEncoder``, scripts/train_user_encoder.py)
BUNDLED_USER_ENCODER: str = str(_HERE / "digits-user-encoder")
#: the generic prompt of the bundled digits model and the template of the class prompts
DIGITS_GENERIC_PROMPT: str = "a handwritten digit"
DIGITS_PROMPT_TEMPLATE: str = "a handwritten digit {}"

__all__ = ["BUNDLED_DIGITS_MODEL", "BUNDLED_DIGITS_PREFERENCES", "BUNDLED_DIGIT_CLASSIFIER", "BUNDLED_DIGIT_JUDGE", "BUNDLED_USER_ENCODER", "DIGITS_GENERIC_PROMPT", "DIGITS_PROMPT_TEMPLATE"]
