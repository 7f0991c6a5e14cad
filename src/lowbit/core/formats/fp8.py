"""FP8: 8-bit floats with a scale, as ONNX ``FLOAT8E4M3FN`` and ``FLOAT8E5M2`` store them (opset 19+).

    code = fp8(x / scale)       round to nearest even, saturating: |x / scale| > max becomes +-max; NaN stays NaN
    x   ~ value(code) * scale   value(code) = (-1)^s * 2^(e - bias) * (1 + m / 2^M), subnormals 2^(1 - bias) * m / 2^M

``fp8_e4m3`` (E4M3FN): 4 exponent bits, bias 7, 3 mantissa bits, no infinities, max 448, NaN = S.1111.111.
``fp8_e5m2``: 5 exponent bits, bias 15, 2 mantissa bits, max 57344 (IEEE-like: infinities and NaNs exist).
Scales are symmetric, ``scale = amax / max`` (448 or 57344), zero point 0 (the byte 0x00), as NVIDIA and ONNX do.
Codes are the uint8 bit patterns, the exact bytes of an ONNX FLOAT8 tensor. Infinite inputs follow ONNX's
QuantizeLinear with ``saturate=1`` (onnx.reference): +-inf becomes +-max in both formats.

>>> from lowbit.core import QuantSpec, quantize, dequantize
>>> spec = QuantSpec(format="fp8_e4m3")
>>> codes = quantize(np.array([1.0, 0.3, -500.0]), 1.0, 0, spec)
>>> codes, dequantize(codes, 1.0, 0, spec)
(array([ 56,  42, 254], dtype=uint8), array([ 1.000e+00,  3.125e-01, -4.480e+02], dtype=float32))
"""

from __future__ import annotations

import numpy as np

from lowbit.core import layout
from lowbit.core.formats import registry as formats
from lowbit.core.quant import checked_range, pow2_ceil
from lowbit.errors import SpecError

_F32_TINY = float(np.finfo(np.float32).tiny)


def decode_table(exponent_bits: int, mantissa_bits: int, finite_only: bool) -> np.ndarray:
    """The float32 value of each of the 256 codes (NaN codes NaN; E5M2's 0x7C/0xFC are +-inf).

    >>> decode_table(4, 3, True)[[0x38, 0x7E, 0x7F, 0x01]].tolist()
    [1.0, 448.0, nan, 0.001953125]
    """
    bias = (1 << (exponent_bits - 1)) - 1
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    e = (codes >> mantissa_bits) & ((1 << exponent_bits) - 1)
    m = codes & ((1 << mantissa_bits) - 1)
    frac = m / float(1 << mantissa_bits)
    value = np.where(e == 0, np.ldexp(frac, 1 - bias), np.ldexp(1.0 + frac, e - bias)) * sign
    top = e == (1 << exponent_bits) - 1
    if finite_only:  # E4M3FN: only S.1111.111 is NaN, the rest of the top exponent are numbers
        value = np.where(top & (m == (1 << mantissa_bits) - 1), np.nan, value)
    else:  # IEEE-like: top exponent is inf (m = 0) or NaN
        value = np.where(top, np.where(m == 0, sign * np.inf, np.nan), value)
    return value.astype(np.float32)


class _FP8(formats.Format):
    """The shared numerics of the two FP8 formats; subclasses give the bit layout."""

    exponent_bits = 0
    mantissa_bits = 0
    finite_only = True
    max_value = 0.0  # the largest finite magnitude: scale = amax / max_value
    nan_code = 0x7F  # the code NaN becomes (with the sign bit of the NaN), as ONNX and ml_dtypes write it

    def __init__(self) -> None:
        self.table = decode_table(self.exponent_bits, self.mantissa_bits, self.finite_only)
        positive = self.table[:128]
        self.finite = positive[np.isfinite(positive)].astype(np.float64)  # codes 0..n-1, increasing

    def check(self, spec) -> None:
        needs = {"bits": 8, "signed": True, "symmetric": True, "narrow_range": False, "rounding": "nearest"}
        for field, value in needs.items():
            if getattr(spec, field) != value:
                raise SpecError(
                    f"QuantSpec.{field} must be {value!r} for format {self.name!r}, got {getattr(spec, field)!r}"
                )

    def qparams(self, lo, hi, spec):
        """``scale = max(|lo|, |hi|) / max_value`` (rounded up to a power of two for ``scale_kind="pow2"``; 1 for
        a zero range), zero point 0 (uint8 bit pattern of +0.0)."""
        lo, hi = checked_range(lo, hi)
        scale = np.maximum(np.abs(lo), np.abs(hi)) / self.max_value
        if spec.scale_kind == "pow2":
            scale = pow2_ceil(scale)
        scale = np.where(scale > 0, np.maximum(scale, _F32_TINY), 1.0).astype(np.float32)
        return scale, np.zeros(scale.shape, dtype=np.uint8)

    def limits(self, spec) -> tuple[float, float]:
        return -self.max_value, self.max_value

    def encode(self, v) -> np.ndarray:
        """The codes of the float32 values ``v`` (no scale): nearest, ties to the even code, saturating."""
        v = np.asarray(v, dtype=np.float32)
        a = np.abs(v).astype(np.float64)
        top = len(self.finite) - 1
        idx = np.clip(np.searchsorted(self.finite, a, side="left"), 1, top)
        below, above = self.finite[idx - 1], self.finite[idx]
        up = (a - below > above - a) | ((a - below == above - a) & (idx % 2 == 0))
        code = np.where(up, idx, idx - 1)
        code = np.where(a >= self.finite[top], top, code)  # saturate, +-inf included (ONNX saturate=1)
        code = np.where(np.isnan(v), self.nan_code, code)
        return (code | np.where(np.signbit(v), 0x80, 0)).astype(np.uint8)

    def quantize(self, x, scale, zero_point, spec, rng=None):
        """``fp8(x / scale)`` as uint8 bit patterns; the division runs in float32, as ONNX QuantizeLinear."""
        x = np.asarray(x, dtype=np.float32)
        s = layout.broadcast(np.asarray(scale, dtype=np.float32), x.shape, spec, "scale")
        with np.errstate(over="ignore"):  # x / scale may overflow to +-inf, which then saturates
            return self.encode(x / s)

    def dequantize(self, codes, scale, zero_point, spec):
        """``value(code) * scale`` in float32."""
        codes = np.asarray(codes)
        if codes.dtype != np.uint8:
            raise SpecError(f"{self.name} codes must be uint8 bit patterns, got dtype {codes.dtype}")
        s = layout.broadcast(np.asarray(scale, dtype=np.float32), codes.shape, spec, "scale")
        return (self.table[codes] * s).astype(np.float32)


@formats.register
class FP8E4M3(_FP8):
    """FP8 E4M3FN: bias 7, 3 mantissa bits, max 448, no infinities (ONNX FLOAT8E4M3FN)."""

    name = "fp8_e4m3"
    summary = "8-bit float E4M3FN (max 448), x ~ scale * fp8(code)"
    exponent_bits, mantissa_bits, finite_only, max_value = 4, 3, True, 448.0


@formats.register
class FP8E5M2(_FP8):
    """FP8 E5M2: bias 15, 2 mantissa bits, max 57344 (ONNX FLOAT8E5M2)."""

    name = "fp8_e5m2"
    summary = "8-bit float E5M2 (max 57344), x ~ scale * fp8(code)"
    exponent_bits, mantissa_bits, finite_only, max_value, nan_code = 5, 2, False, 57344.0, 0x7E


FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")


def fp8_max(name: str) -> float:
    """The largest finite value of the FP8 format ``name`` (448 or 57344)."""
    return formats.get(name).max_value
