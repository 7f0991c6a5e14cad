"""The registry of number formats: a name -> one :class:`Format`, each defined in its own file of this package.

A format says how a real value becomes a stored code and back, given a scale (and a zero point): uniform integers
(``int``, :mod:`lowbit.core.quant`), and the non-uniform ones that register here (FP8, logarithmic, ternary, ...).
:class:`~lowbit.core.QuantSpec` names its format (``QuantSpec(format="fp8_e4m3")``); :func:`lowbit.core.qparams`,
:func:`~lowbit.core.quantize`, :func:`~lowbit.core.dequantize` and :func:`~lowbit.core.fake_quant` dispatch to it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from lowbit.errors import SpecError

_FORMATS: dict[str, Format] = {}


class Format:
    """One number format. Subclasses set :attr:`name` and implement the methods that raise here; ``spec`` is
    always a :class:`~lowbit.core.QuantSpec` (not imported here: it validates its format through this registry)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line: the codes and the values they stand for
    weights_only: ClassVar[bool] = False  # a format for constant weights (its codes depend on the whole tensor)
    scale_from_tensor: ClassVar[bool] = False  # the scale is a statistic of the tensor itself, not of a range

    def check(self, spec) -> None:
        """A SpecError naming the first field of ``spec`` this format cannot honour (none by default)."""

    def qparams(self, lo, hi, spec) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point for the real range [lo, hi] (floats, or arrays of the parameter shape)."""
        raise NotImplementedError

    def quantize(self, x, scale, zero_point, spec, rng=None) -> np.ndarray:
        """The stored codes of ``x``."""
        raise NotImplementedError

    def dequantize(self, codes, scale, zero_point, spec) -> np.ndarray:
        """The real values (float32) the codes stand for."""
        raise NotImplementedError

    def tensor_qparams(self, x, spec) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point from ``x`` itself, for a format whose scale is a statistic of the tensor
        (:attr:`scale_from_tensor`); :func:`lowbit.core.qparams_from_tensor` calls it."""
        raise NotImplementedError

    def label(self, spec) -> str:
        """A short name of ``spec`` in this format for tables (``log2_4``, ``fp8_e4m3_8``)."""
        return f"{self.name}_{spec.bits}"

    def limits(self, spec) -> tuple[float, float]:
        """The lowest and highest value ``x / scale + zero_point`` may take on this format's grid:
        ``(spec.qmin, spec.qmax)`` by default (integer codes)."""
        return float(spec.qmin), float(spec.qmax)

    def packed_bits(self, spec) -> float:
        """Bits one value takes when packed densely (the size a runtime that packs this format would store)."""
        return float(spec.bits)


def register(cls: type[Format]) -> type[Format]:
    """Class decorator: make the format ``cls.name`` available by name."""
    if not cls.name:
        raise SpecError(f"format class {cls.__name__} has no name")
    if cls.name in _FORMATS:
        raise SpecError(f"a number format named {cls.name!r} is registered twice")
    _FORMATS[cls.name] = cls()
    return cls


def label(spec) -> str:
    """A short name of ``spec``'s format for tables: ``int8``, ``int4``, ``binary``, ``ternary``, ``log2_4``."""
    return get(spec.format).label(spec)


def limits(spec) -> tuple[float, float]:
    """The lowest and highest value ``x / scale + zero_point`` may take on the grid of ``spec``: ``(qmin, qmax)``
    for integers, ``(-max, max)`` for FP8 (448 or 57344), whose scale is ``amax / max``."""
    return get(spec.format).limits(spec)


def scales_itself(spec) -> bool:
    """Whether ``spec``'s (a QuantSpec's, or anything with ``format`` and ``bits``: a QuantizerConfig's) scale
    comes from the tensor it quantizes at every use (binarization, ``bits=1`` of
    ``int``: mean|x|; ternary) rather than from a calibrated range."""
    if spec.format == "int":
        return spec.bits == 1
    return get(spec.format).scale_from_tensor


def weights_only(spec) -> bool:
    """Whether ``spec`` (with ``format`` and ``bits``) quantizes constant weights only (binary, ternary, log2):
    refused on activations."""
    return scales_itself(spec) or (spec.format != "int" and get(spec.format).weights_only)


def available() -> tuple[str, ...]:
    """The registered format names, ``int`` first, the others in alphabetical order."""
    return tuple(sorted(_FORMATS, key=lambda name: (name != "int", name)))


def get(name: str) -> Format:
    """The format called ``name``; an unknown name lists the formats."""
    if name not in _FORMATS:
        raise SpecError(f"unknown number format {name!r}; formats: {', '.join(available())}")
    return _FORMATS[name]
