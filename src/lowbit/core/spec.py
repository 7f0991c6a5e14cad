"""QuantSpec: what a quantizer does, as one frozen, self-validating value."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lowbit.core.formats import registry as formats
from lowbit.errors import SpecError

ROUNDINGS = ("nearest", "stochastic")
SCALE_KINDS = ("float", "pow2")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class QuantSpec:
    """How to map real numbers to ``bits``-bit integers.

    ``x_q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x ~ scale * (x_q - zero_point)``.

    Fields:
        bits: 1..16. ``bits=1`` is binarization: codes {-1, +1}, ``x ~ sign(x) * mean|x|``.
        signed: integer codes in [-2^(b-1), 2^(b-1) - 1] (True) or [0, 2^b - 1] (False).
        symmetric: the real range is [-amax, amax]; signed codes get zero_point 0, unsigned codes
            the middle of their grid (2^(b-1)), so uint8 symmetric is int8 symmetric shifted by 128.
            Asymmetric ranges always contain 0, so that 0.0 is exactly representable.
        narrow_range: drop the lowest code (int8: [-127, 127]), as TensorRT's weights use.
        axis: None = one scale per tensor; an int = one scale per slice along that axis (per-channel).
        group_size: with ``axis``, one scale per block of ``group_size`` elements along ``axis``
            (ONNX blocked quantization; the last block may be shorter).
        rounding: ``"nearest"`` (half to even, as ONNX QuantizeLinear) or ``"stochastic"``
            (``floor(x / scale + u)``, u ~ U[0, 1)).
        seed: seed of stochastic rounding, so that a run can be repeated.
        scale_kind: ``"float"`` or ``"pow2"`` (scales rounded up to a power of two: fixed point).
        format: the number format of the codes (:func:`lowbit.core.formats.available`): ``"int"`` (uniform
            integers, the default) or a registered one (``"fp8_e4m3"``, ...), which decides what the other fields
            may be.

    >>> QuantSpec(bits=4, axis=0).qmin, QuantSpec(bits=4, axis=0).qmax
    (-8, 7)
    >>> QuantSpec(bits=4, axis=1, group_size=32).granularity
    'group'
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    axis: int | None = None
    group_size: int | None = None
    rounding: str = "nearest"
    seed: int | None = None
    scale_kind: str = "float"
    format: str = "int"

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not 1 <= self.bits <= 16:
            raise SpecError(f"QuantSpec.bits must be an integer from 1 to 16, got {self.bits!r}")
        for name in ("signed", "symmetric", "narrow_range"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise SpecError(f"QuantSpec.{name} must be True or False, got {value!r}")
        if self.axis is not None and not _is_int(self.axis):
            raise SpecError(
                f"QuantSpec.axis must be None (per-tensor) or an integer axis (per-channel), got {self.axis!r}"
            )
        if self.group_size is not None:
            if not _is_int(self.group_size) or self.group_size < 1:
                raise SpecError(f"QuantSpec.group_size must be a positive integer or None, got {self.group_size!r}")
            if self.axis is None:
                raise SpecError(
                    "QuantSpec.group_size needs an axis: blocks of group_size run along that axis "
                    "(for a [out, in] weight, axis=1)"
                )
        if self.rounding not in ROUNDINGS:
            raise SpecError(
                f"QuantSpec.rounding must be one of {', '.join(map(repr, ROUNDINGS))}, got {self.rounding!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise SpecError(f"QuantSpec.seed must be None or a non-negative integer, got {self.seed!r}")
        if self.scale_kind not in SCALE_KINDS:
            raise SpecError(
                f"QuantSpec.scale_kind must be one of {', '.join(map(repr, SCALE_KINDS))}, got {self.scale_kind!r}"
            )
        if self.format not in formats.available():
            raise SpecError(
                f"QuantSpec.format must be one of {', '.join(map(repr, formats.available()))}, got {self.format!r}"
            )
        if self.format != "int":
            formats.get(self.format).check(self)
            return
        if self.bits == 1 and not (self.signed and self.symmetric):
            raise SpecError(
                "QuantSpec.bits=1 is binarization (sign(x) * mean|x|): it needs signed=True and symmetric=True"
            )
        if self.bits == 1 and self.scale_kind != "float":
            raise SpecError("QuantSpec.bits=1 is binarization, whose scale is mean|x|: it needs scale_kind='float'")

    @property
    def qmin(self) -> int:
        """The lowest integer code."""
        if self.bits == 1:
            return -1
        if self.signed:
            return -(1 << (self.bits - 1)) + int(self.narrow_range)
        return int(self.narrow_range)

    @property
    def qmax(self) -> int:
        """The highest integer code."""
        if self.bits == 1:
            return 1
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def granularity(self) -> str:
        """``"tensor"``, ``"channel"`` or ``"group"``."""
        if self.axis is None:
            return "tensor"
        return "channel" if self.group_size is None else "group"

    @property
    def dtype(self) -> np.dtype:
        """The NumPy integer type that stores the codes (4-bit codes live in int8 / uint8)."""
        if self.bits <= 8:
            return np.dtype(np.int8 if self.signed else np.uint8)
        return np.dtype(np.int16 if self.signed else np.uint16)

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        return QuantSpec(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise SpecError(
                f"unknown QuantSpec field(s) {', '.join(unknown)}; "
                f"the fields are: {', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**data)
