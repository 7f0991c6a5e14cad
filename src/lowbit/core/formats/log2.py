"""Logarithmic weights: every code a signed power of two times a per-tensor or per-channel scale.

With ``M = 2^(bits-1) - 1`` (4 bits: 7), the int8 code ``c`` in ``[-M, M]`` stands for

    c = 0:      0
    c != 0:     sign(c) * scale * 2^(|c| - M)          |c| = M is the scale itself, |c| = 1 is scale * 2^(1-M)

so ``w ~ sign(w) * scale * 2^-k`` with ``k`` in ``0..K``, ``K = M - 1`` (1 sign bit; one code for zero; the
code ``-0`` of a sign-magnitude byte is unused). 4 bits: 0, +-s/64, +-s/32, ..., +-s/2, +-s (15 of 16 codes);
3 bits: 0, +-s/4, +-s/2, +-s.

``scale`` = max|w| of the slice (``scale_kind="float"``: the largest weight is exact) or that rounded up to a
power of two (``"pow2"``: every value is then an exact power of two, a multiplication is a shift).

Rounding, with ``r = min(|w| / scale, 1) = m * 2^e`` (``m`` in [1, 2)): the power ``2^(e+1)`` when ``m`` passes
the threshold, else ``2^e``; below the smallest power, zero or the smallest power, whichever is nearer.
:data:`DOMAINS`: ``"linear"`` (the nearest power, ``m > 1.5``; zero below half the smallest power) or ``"log"``
(``round(log2 r)``, ``m > sqrt(2)``; zero below ``2^(1/2 - M)``). Measured on the Fashion-MNIST benchmark models'
weights (benchmarks/lowbit_weights_bench.py), linear gives the lower squared error, so it is the default
(:data:`DEFAULT_DOMAIN`).

>>> from lowbit.core import QuantSpec, qparams, quantize, dequantize
>>> spec = QuantSpec(bits=4, format="log2")
>>> s, z = qparams(-1.0, 1.0, spec)
>>> c = quantize(np.array([1.0, -0.3, 0.7, 0.004, 0.01]), s, z, spec); c
array([ 7, -5,  6,  0,  1], dtype=int8)
>>> dequantize(c, s, z, spec).tolist()
[1.0, -0.25, 0.5, 0.0, 0.015625]
"""

from __future__ import annotations

import numpy as np

from lowbit.core import layout
from lowbit.core.formats import registry
from lowbit.core.quant import checked_range, pow2_ceil
from lowbit.errors import SpecError

DOMAINS = {"linear": 0.75, "log": float(np.sqrt(0.5))}  # mantissa of r (frexp's, in [0.5, 1)) above which 2^(e+1)
DEFAULT_DOMAIN = "linear"


def levels(bits: int) -> int:
    """``M = 2^(bits-1) - 1``: the number of powers of two (and the largest code)."""
    return (1 << (bits - 1)) - 1


def table(bits: int) -> np.ndarray:
    """The value of every code ``-M..M`` at scale 1 (index ``c + M``), float32."""
    m = levels(bits)
    c = np.arange(-m, m + 1)
    return np.where(c == 0, 0.0, np.sign(c) * np.exp2(np.abs(c) - m)).astype(np.float32)


def log2_codes(x, scale, spec, domain: str = DEFAULT_DOMAIN) -> np.ndarray:
    """The int8 codes of ``x`` (see the module docstring)."""
    if domain not in DOMAINS:
        raise SpecError(f"log2 rounding domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    x = np.asarray(x, dtype=np.float32)
    s = layout.broadcast(np.asarray(scale, dtype=np.float32), x.shape, spec, "scale").astype(np.float64)
    m = levels(spec.bits)
    r = np.minimum(np.abs(x) / s, 1.0)
    mant, exp = np.frexp(r)  # r = mant * 2^exp, mant in [0.5, 1)
    e = exp - 1 + (mant > DOMAINS[domain])  # the chosen power's exponent, <= 0
    if domain == "linear":
        e = np.where(r >= 2.0**-m, np.maximum(e, 1 - m), e)  # past half the smallest power: that power, not 0
    mag = np.where((r > 0) & (e >= 1 - m), e + m, 0)
    return (np.sign(x) * mag).astype(np.int8)


@registry.register
class Log2Format(registry.Format):
    name = "log2"
    summary = "codes -M..M: 0 and sign * scale * 2^(|c| - M), M = 2^(bits-1) - 1; scale max|w|; weights only"
    weights_only = True

    def check(self, spec) -> None:
        if not 2 <= spec.bits <= 8:
            raise SpecError(f"format 'log2' stores int8 codes: bits must be 2 to 8, got bits={spec.bits}")
        if not (spec.signed and spec.symmetric):
            raise SpecError("format 'log2' is sign and magnitude: it needs signed=True and symmetric=True")
        if spec.rounding != "nearest":
            raise SpecError("format 'log2' rounds to the nearest power of two: rounding must be 'nearest'")

    def limits(self, spec) -> tuple[float, float]:
        return -1.0, 1.0  # |x| / scale <= 1: the scale is max|w|, the largest code's value

    def qparams(self, lo, hi, spec):
        lo, hi = checked_range(lo, hi)
        scale = np.maximum(np.abs(lo), np.abs(hi))
        if spec.scale_kind == "pow2":
            scale = pow2_ceil(scale)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return scale, np.zeros(scale.shape, dtype=np.int8)

    def quantize(self, x, scale, zero_point, spec, rng=None):
        return log2_codes(x, scale, spec)

    def dequantize(self, codes, scale, zero_point, spec):
        q = np.asarray(codes).astype(np.int64)
        s = layout.broadcast(np.asarray(scale, dtype=np.float32), q.shape, spec, "scale")
        return (table(spec.bits)[q + levels(spec.bits)] * s).astype(np.float32)
