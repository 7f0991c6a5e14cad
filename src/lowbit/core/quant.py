"""Linear quantization as pure NumPy functions, with the semantics of ONNX QuantizeLinear/DequantizeLinear.

    x_q = clamp(round(x / scale) + zero_point, qmin, qmax)          quantize
    x   ~ (x_q - zero_point) * scale                                  dequantize

Division and multiplication run in float32, as ONNX Runtime and onnx.reference do, so that the integer codes
lowbit computes are the codes a runtime computes.
"""

from __future__ import annotations

import numpy as np

from lowbit.core import layout
from lowbit.core.spec import QuantSpec
from lowbit.errors import SpecError

_F32_TINY = float(np.finfo(np.float32).tiny)


def qparams(lo, hi, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point that map the real range [lo, hi] onto the integer grid of ``spec``.

    Symmetric:  amax = max(|lo|, |hi|);  scale = amax / (2^(bits-1) - 1);
                zero_point = 0 (signed) or 2^(bits-1) (unsigned).  int8: scale = amax / 127, as TensorRT.
    Asymmetric: lo = min(lo, 0), hi = max(hi, 0)   (the range always contains 0);
                scale = (hi - lo) / (qmax - qmin);  zero_point = clamp(round(qmin - lo / scale), qmin, qmax).
    ``scale_kind="pow2"`` rounds each scale up to a power of two, so no value in the range is clipped.
    A zero range (all zeros) gets scale 1.

    ``lo`` and ``hi`` are floats (per tensor) or arrays of :func:`layout.param_shape` (per channel / group).
    Scales come back as float32, zero points in the storage type of ``spec`` (int8, uint8, int16, uint16).

    >>> qparams(-1.0, 1.0, QuantSpec())
    (array(0.00787402, dtype=float32), array(0, dtype=int8))
    >>> qparams(2.5, 3.5, QuantSpec(signed=False, symmetric=False))   # one-sided: range becomes (0, 3.5)
    (array(0.01372549, dtype=float32), array(0, dtype=uint8))
    """
    if spec.bits == 1:
        raise SpecError(
            "1-bit quantization is binarization: its scale is mean|x| of the data, not a function of a "
            "range; use binary_scale(x, spec)"
        )
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if lo.shape != hi.shape:
        raise SpecError(f"lo and hi must have the same shape, got {lo.shape} and {hi.shape}")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise SpecError("the range [lo, hi] contains NaN or Inf: calibrate on finite data")
    if np.any(lo > hi):
        raise SpecError("every lo must be <= hi in the range [lo, hi]")
    if spec.symmetric:
        half = (1 << (spec.bits - 1)) - 1
        scale = np.maximum(np.abs(lo), np.abs(hi)) / half
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = (hi - lo) / (spec.qmax - spec.qmin)
    if spec.scale_kind == "pow2":
        scale = np.where(scale > 0, np.exp2(np.ceil(np.log2(np.where(scale > 0, scale, 1.0)))), 0.0)
    scale = np.where(scale > 0, np.maximum(scale, _F32_TINY), 1.0).astype(np.float32)
    if spec.symmetric:
        zp = np.full(scale.shape, 0 if spec.signed else 1 << (spec.bits - 1), dtype=np.float64)
    else:
        zp = np.clip(np.rint(spec.qmin - lo / scale.astype(np.float64)), spec.qmin, spec.qmax)
    return scale, np.asarray(zp).astype(spec.dtype)


def quantize(x, scale, zero_point, spec: QuantSpec, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """Integer codes of ``x``: ``clamp(round(x / scale) + zero_point, qmin, qmax)``.

    ``round`` is half to even (``rounding="nearest"``, as ONNX) or ``floor(x / scale + u)`` with
    u ~ U[0, 1) (``rounding="stochastic"``; ``rng`` defaults to one seeded with ``spec.seed``).
    For ``bits=1`` the codes are sign(x) in {-1, +1} (0 maps to +1); stochastic binarization draws +1 with
    probability clip((x / scale + 1) / 2, 0, 1).

    >>> quantize(np.array([0.5, 1.5, 2.5, -300.0]), 1.0, 0, QuantSpec())
    array([   0,    2,    2, -128], dtype=int8)
    """
    x = np.asarray(x, dtype=np.float32)
    s = layout.broadcast(np.asarray(scale, dtype=np.float32), x.shape, spec, "scale")
    z = layout.broadcast(np.asarray(zero_point), x.shape, spec, "zero_point").astype(np.float32)
    with np.errstate(over="ignore"):  # x / scale may overflow to +-inf, which then saturates
        v = x / s
    if spec.rounding == "stochastic":
        rng = rng if rng is not None else np.random.default_rng(spec.seed)
        u = rng.random(x.shape, dtype=np.float32)
        if spec.bits == 1:
            return np.where(u < np.clip((v + 1) / 2, 0, 1), 1, -1).astype(spec.dtype)
        v = np.floor(v + u)
    elif spec.bits == 1:
        return np.where(v >= 0, 1, -1).astype(spec.dtype)
    else:
        v = np.rint(v)
    return np.clip(v + z, spec.qmin, spec.qmax).astype(spec.dtype)


def dequantize(q, scale, zero_point, spec: QuantSpec) -> np.ndarray:
    """Real values of integer codes: ``(q - zero_point) * scale``, in float32.

    >>> dequantize(np.array([0, 2, -128], dtype=np.int8), 0.5, 0, QuantSpec())
    array([  0.,   1., -64.], dtype=float32)
    """
    q = np.asarray(q)
    s = layout.broadcast(np.asarray(scale, dtype=np.float32), q.shape, spec, "scale")
    z = layout.broadcast(np.asarray(zero_point), q.shape, spec, "zero_point")
    return ((q.astype(np.float32) - z.astype(np.float32)) * s).astype(np.float32)


def fake_quant(x, scale, zero_point, spec: QuantSpec, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """``dequantize(quantize(x))``: the real value each element becomes after quantization.

    >>> fake_quant(np.array([0.26, -0.74]), 0.5, 0, QuantSpec(bits=4))
    array([ 0.5, -0.5], dtype=float32)
    """
    return dequantize(quantize(x, scale, zero_point, spec, rng=rng), scale, zero_point, spec)


def binary_scale(x, spec: QuantSpec) -> np.ndarray:
    """The scale of 1-bit binarization: mean|x| per tensor, channel or group, as float32."""
    scale = layout.reduce(np.asarray(x), spec, "absmean")
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def qparams_from_tensor(x, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point from the min/max of ``x`` itself, laid out as ``spec`` says (weights, mostly).

    For ``bits=1`` the scale is mean|x| (binarization) and the zero point 0.

    >>> w = np.array([[1.0, -0.5], [0.25, 0.125]])
    >>> qparams_from_tensor(w, QuantSpec(axis=0))[0] * 127
    array([1.  , 0.25], dtype=float32)
    """
    x = np.asarray(x)
    if spec.bits == 1:
        scale = binary_scale(x, spec)
        return scale, np.zeros(scale.shape, dtype=spec.dtype)
    return qparams(layout.reduce(x, spec, "min"), layout.reduce(x, spec, "max"), spec)


def binarize(x, axis: int | None = None) -> np.ndarray:
    """1-bit binarization ``sign(x) * mean|x|``, per tensor or per slice along ``axis``.

    >>> binarize(np.array([[1.0, -3.0], [0.5, 0.5]]), axis=0)
    array([[ 2. , -2. ],
           [ 0.5,  0.5]], dtype=float32)
    """
    spec = QuantSpec(bits=1, axis=axis)
    scale, zp = qparams_from_tensor(x, spec)
    return fake_quant(x, scale, zp, spec)


def mse_range_per_slice(x, spec: QuantSpec, num_candidates: int = 80, smallest: float = 0.2):
    """Per channel (or group) of ``x`` as ``spec`` lays them out, the range ``(lo, hi) * f`` with ``f`` among
    ``num_candidates`` values from ``smallest`` to 1 that gives the least ``sum((x - fake_quant(x))^2)`` in that
    slice: clipping a few large weights buys a finer grid for the rest, which at 4 bits matters more than the
    clipped ones. Returns ``(lo, hi)`` in :func:`~lowbit.core.layout.param_shape`.

    >>> rng = np.random.default_rng(0)
    >>> w = np.stack([rng.standard_normal(4096), rng.uniform(-1, 1, 4096)]).astype(np.float32)
    >>> lo, hi = mse_range_per_slice(w, QuantSpec(bits=4, axis=0))
    >>> bool(hi[0] < 0.85 * w[0].max()), bool(hi[1] > 0.9 * w[1].max())   # Gaussian tails clipped, uniform kept
    (True, True)
    """
    x = np.asarray(x, dtype=np.float32)
    lo, hi = layout.reduce(x, spec, "min"), layout.reduce(x, spec, "max")
    best_lo, best_hi, best = lo, hi, None
    for f in np.linspace(1.0, smallest, num_candidates):
        cand_lo, cand_hi = lo * f, hi * f
        scale, zp = qparams(cand_lo, cand_hi, spec)
        d = x.astype(np.float64) - fake_quant(x, scale, zp, spec)
        err = layout.reduce(d * d, spec, "sum")
        if best is None:
            best = err
            continue
        better = err < best
        best = np.where(better, err, best)
        best_lo, best_hi = np.where(better, cand_lo, best_lo), np.where(better, cand_hi, best_hi)
    return best_lo, best_hi
