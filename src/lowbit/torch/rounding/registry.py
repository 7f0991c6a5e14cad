"""The registry of the PyTorch front end's weight roundings: name -> the function that sets the integer codes of a
calibrated model's weights.

A method is a function ``fn(model, calib, *, progress)`` in a file of its own under ``lowbit/torch/rounding/``,
registered with ``@register("name")`` there and imported by the package (:mod:`lowbit.torch.rounding`), so that
:func:`lowbit.torch.quantize` finds it by the recipe's ``rounding``. Not to be confused with the rounding of each
element to its grid (:data:`lowbit.core.ROUNDINGS`: nearest, stochastic): these choose the weights' codes.

    @register("toward_zero")
    def toward_zero(model, calib, *, progress=True): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowbit.errors import SpecError
from lowbit.recipe import Config

Apply = Callable[..., Any]  # fn(model, calib, *, progress: bool)
Options = Callable[[Config], dict[str, Any]]  # the recipe's fields a method reads, as its keyword arguments


def no_options(config: Config) -> dict[str, Any]:
    """A method that reads nothing from the recipe."""
    return {}


@dataclass(frozen=True)
class WeightRounding:
    """A weight rounding: ``apply(model, calib, progress=...)`` sets the codes of a calibrated model.
    ``needs_data``: it reads ``calib`` (False: it needs no data, as ``nearest``); ``batches_only``: it needs
    calibration batches, not a forward loop ``calib(model)``; ``options(config)``: the keyword arguments of
    ``apply`` that the recipe sets (GPTQ's ``act_order``, say), read once here from the typed config;
    ``scales_weights``: it changes the float weights (and the ops before them), not only the codes (AWQ): it runs
    once, and a search that rounds a model again (:mod:`lowbit.torch.sensitivity`) does not use it."""

    name: str
    apply: Apply
    needs_data: bool = True
    batches_only: bool = False
    options: Options = no_options
    scales_weights: bool = False


METHODS: dict[str, WeightRounding] = {}


def register(
    name: str,
    *,
    needs_data: bool = True,
    batches_only: bool = False,
    options: Options = no_options,
    scales_weights: bool = False,
) -> Callable[[Apply], Apply]:
    """Decorator: make ``fn(model, calib, *, progress)`` the weight rounding called ``name`` (the function itself
    is returned unchanged); ``options(config)`` gives the keyword arguments it takes from the recipe. A second
    function under a name already taken is an error."""

    def add(fn: Apply) -> Apply:
        if name in METHODS and METHODS[name].apply is not fn:
            raise ValueError(f"a weight rounding named {name!r} is already registered ({METHODS[name].apply.__name__})")
        METHODS[name] = WeightRounding(name, fn, needs_data, batches_only, options, scales_weights)
        return fn

    return add


def available() -> list[str]:
    """The names of the registered weight roundings, sorted."""
    return sorted(METHODS)


def get(name: str) -> WeightRounding:
    """The weight rounding called ``name``; an unknown name is a :class:`~lowbit.errors.SpecError` that lists them."""
    if name not in METHODS:
        raise SpecError(f"rounding must be one of {', '.join(available())}, got {name!r}")
    return METHODS[name]
