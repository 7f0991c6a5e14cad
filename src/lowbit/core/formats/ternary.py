"""Ternary weights (TWN, Li et al. 2016, "Ternary Weight Networks"): codes {-1, 0, +1}, one scale per tensor or
output channel.

    delta = 0.7 * mean|w|                        (per slice: TWN's threshold; fixed, not learned)
    code  = sign(w) * [|w| > delta]              in {-1, 0, +1}
    scale = mean(|w| over |w| > delta)           (the least-squares scale of those codes)
    w    ~ scale * code

The codes depend on ``w`` alone (the threshold is a statistic of the tensor), not on the scale: the format is for
constant weights (``weights_only``) and its scale is recomputed from the weight at every use (``scale_from_tensor``:
in QAT at every forward). Stored in 2 bits per weight (:meth:`TernaryFormat.packed_bits`; log2(3) = 1.58 bits is
the bound a base-3 packing of five codes per byte, 1.6 bits, approaches).

>>> from lowbit.core import QuantSpec, qparams_from_tensor, quantize
>>> spec = QuantSpec(bits=2, format="ternary")
>>> w = np.array([0.1, -0.9, 1.1, 0.3])
>>> quantize(w, 1.0, 0, spec)          # delta = 0.7 * 0.6 = 0.42
array([ 0, -1,  1,  0], dtype=int8)
>>> float(qparams_from_tensor(w, spec)[0])   # mean(0.9, 1.1)
1.0
"""

from __future__ import annotations

import numpy as np

from lowbit.core import layout
from lowbit.core.formats import registry
from lowbit.errors import SpecError

THRESHOLD = 0.7  # TWN: delta = 0.7 * mean|w| approximates the threshold that minimises ||w - scale * code||^2


def ternary_codes(x, spec) -> np.ndarray:
    """``sign(x) * [|x| > 0.7 * mean|x|]`` per slice of ``spec``, as int8."""
    x = np.asarray(x, dtype=np.float32)
    delta = THRESHOLD * layout.broadcast(layout.reduce(x, spec, "absmean"), x.shape, spec, "threshold")
    return (np.sign(x) * (np.abs(x) > delta)).astype(np.int8)


def ternary_scale(x, spec) -> np.ndarray:
    """``mean(|x| over |x| > delta)`` per slice (1 where a slice is all zeros), float32."""
    x = np.asarray(x, dtype=np.float32)
    kept = np.abs(ternary_codes(x, spec)).astype(np.float64)
    total = layout.reduce(np.abs(x) * kept, spec, "sum")
    count = layout.reduce(kept, spec, "sum")
    scale = np.where(count > 0, total / np.maximum(count, 1), 1.0)
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


@registry.register
class TernaryFormat(registry.Format):
    name = "ternary"
    summary = "codes {-1, 0, +1}, threshold 0.7 * mean|w|, scale mean|w| above it (TWN), weights only"
    weights_only = True
    scale_from_tensor = True

    def check(self, spec) -> None:
        if spec.bits != 2:
            raise SpecError(f"format 'ternary' stores its 3 codes in 2 bits: it needs bits=2, got bits={spec.bits}")
        if not (spec.signed and spec.symmetric) or spec.narrow_range:
            raise SpecError("format 'ternary' is symmetric: it needs signed=True, symmetric=True, narrow_range=False")
        if spec.rounding != "nearest" or spec.scale_kind != "float":
            raise SpecError(
                "format 'ternary' codes by a threshold at a float scale (TWN): it needs rounding='nearest' and "
                "scale_kind='float'"
            )

    def qparams(self, lo, hi, spec):
        raise SpecError(
            "format 'ternary' takes its scale from the weight itself (mean|w| above 0.7 * mean|w|), not from a range: "
            "use lowbit.core.qparams_from_tensor(w, spec)"
        )

    def label(self, spec) -> str:
        return self.name  # always 2 bits

    def tensor_qparams(self, x, spec):
        scale = ternary_scale(x, spec)
        return scale, np.zeros(scale.shape, dtype=np.int8)

    def quantize(self, x, scale, zero_point, spec, rng=None):
        return ternary_codes(x, spec)

    def dequantize(self, codes, scale, zero_point, spec):
        q = np.asarray(codes)
        s = layout.broadcast(np.asarray(scale, dtype=np.float32), q.shape, spec, "scale")
        return (q.astype(np.float32) * s).astype(np.float32)

    def packed_bits(self, spec) -> float:
        return 2.0
