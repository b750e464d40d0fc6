"""Training data of the preference trainers: Pick-a-Pic style pairs (:mod:`.preference`) and the simulated digits
preference data built on the bundled model (:mod:`.digits_preferences`)."""

from .preference import DataReport, PairBatch, PreferenceDataError, PreferencePairs, decode_image, preprocess_image

__all__ = ["DataReport", "PairBatch", "PreferenceDataError", "PreferencePairs", "decode_image", "preprocess_image"]
