"""How the PyTorch front end gives a quantized model's weights their integer codes, by name: a registry of
weight roundings, applied after calibration.

``nearest`` keeps the codes calibration gave (each weight to its nearest code); ``gptq`` chooses the codes of the
Conv/Linear weights for the least output error on the calibration data (:mod:`lowbit.torch.rounding`); ``adaround``
learns them layer by layer on the quantized model's own inputs (:mod:`lowbit.torch.learned_rounding`). Adding one
is a function ``fn(model, calib, progress)`` in a file of its own and a :func:`register` line here.

>>> available()
['adaround', 'gptq', 'nearest']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit.errors import SpecError
from lowbit.torch.learned_rounding import adaround
from lowbit.torch.rounding import gptq


@dataclass(frozen=True)
class WeightRounding:
    """A weight rounding: ``apply(model, calib, progress)`` sets the codes of a calibrated model (None: the
    nearest codes calibration set stay); ``batches_only``: it needs calibration batches, not a forward loop."""

    name: str
    apply: Callable[[nn.Module, Any, bool], Any] | None = None
    batches_only: bool = False

    @property
    def needs_data(self) -> bool:
        return self.apply is not None


_METHODS: dict[str, WeightRounding] = {}


def register(method: WeightRounding) -> WeightRounding:
    _METHODS[method.name] = method
    return method


def available() -> list[str]:
    return sorted(_METHODS)


def get(name: str) -> WeightRounding:
    """The rounding called ``name``; an unknown name lists them."""
    if name not in _METHODS:
        raise SpecError(f"rounding must be one of {', '.join(available())}, got {name!r}")
    return _METHODS[name]


register(WeightRounding("nearest"))
register(WeightRounding("gptq", lambda model, calib, progress: gptq(model, calib, progress=progress)))
register(
    WeightRounding(
        "adaround", lambda model, calib, progress: adaround(model, calib, progress=progress), batches_only=True
    )
)
