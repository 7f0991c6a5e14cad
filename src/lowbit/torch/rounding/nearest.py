"""Nearest rounding: each weight keeps the code calibration gave it, its nearest one. Nothing to do, no data."""

from __future__ import annotations

from typing import Any

from torch import nn

from lowbit.torch.rounding.registry import register


@register("nearest", needs_data=False)
def nearest(model: nn.Module, calib: Any = None, *, progress: bool = True) -> list[str]:
    """Leave ``model``'s weight codes as calibration set them; returns the layers rounded otherwise: none."""
    return []
