"""The built-in targets, one file each; importing this package registers them (``lowbit.recipe`` does)."""

from lowbit.recipe.targets import ort, qdq, trt

__all__ = ["ort", "qdq", "trt"]
