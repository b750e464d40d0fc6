"""Losses as pure tensor functions, tested against independent computations of their formulas."""

from .preference import LOSS_TYPES, PairErrors

__all__ = ["LOSS_TYPES", "PairErrors"]
