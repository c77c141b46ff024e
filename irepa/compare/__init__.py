"""Recipes compared side by side: the same data and seeds, quality against training steps.

`launch/compare.py` is the entry point. spec (what runs) -> runner (train in segments,
evaluate each checkpoint, resumable, one run per rank) -> evaluate (Inception FID or the
classifier distance) -> report (CSV, markdown, PNG, TensorBoard). backend is the only
module that touches the trainer.
"""
from .spec import CompareSpec, Recipe, digits_default

__all__ = ["CompareSpec", "Recipe", "digits_default"]
