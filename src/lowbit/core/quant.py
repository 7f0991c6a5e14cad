"""Linear quantization as pure NumPy functions, with the semantics of ONNX QuantizeLinear/DequantizeLinear.

    x_q = clamp(round(x / scale) + zero_point, qmin, qmax)          quantize
    x   ~ (x_q - zero_point) * scale                                  dequantize

Division and multiplication run in float32, as ONNX Runtime and onnx.reference do, so that the integer codes
lowbit computes are the codes a runtime computes.
"""

from __future__ import annotations

import numpy as np

from lowbit.core import layout
from lowbit.core.formats import registry as formats
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
    if spec.format != "int":
        return formats.get(spec.format).qparams(lo, hi, spec)
    if spec.bits == 1:
        raise SpecError(
            "1-bit quantization is binarization: its scale is mean|x| of the data, not a function of a "
            "range; use binary_scale(x, spec)"
        )
    lo, hi = checked_range(lo, hi)
    if spec.symmetric:
        half = (1 << (spec.bits - 1)) - 1
        scale = np.maximum(np.abs(lo), np.abs(hi)) / half
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = (hi - lo) / (spec.qmax - spec.qmin)
    if spec.scale_kind == "pow2":
        scale = pow2_ceil(scale)
    scale = np.where(scale > 0, np.maximum(scale, _F32_TINY), 1.0).astype(np.float32)
    if spec.symmetric:
        zp = np.full(scale.shape, 0 if spec.signed else 1 << (spec.bits - 1), dtype=np.float64)
    else:
        zp = np.clip(np.rint(spec.qmin - lo / scale.astype(np.float64)), spec.qmin, spec.qmax)
    return scale, np.asarray(zp).astype(spec.dtype)


def pow2_ceil(scale) -> np.ndarray:
    """Each positive scale rounded up to a power of two, ``2^ceil(log2 s)`` (a zero scale stays 0).

    >>> pow2_ceil(np.array([0.3, 0.25, 0.0]))
    array([0.5 , 0.25, 0.  ])
    """
    scale = np.asarray(scale, dtype=np.float64)
    return np.where(scale > 0, np.exp2(np.ceil(np.log2(np.where(scale > 0, scale, 1.0)))), 0.0)


def checked_range(lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` as float64 arrays, or a SpecError if their shapes differ, a bound is NaN or Inf, or a lo
    exceeds its hi."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if lo.shape != hi.shape:
        raise SpecError(f"lo and hi must have the same shape, got {lo.shape} and {hi.shape}")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise SpecError("the range [lo, hi] contains NaN or Inf: calibrate on finite data")
    if np.any(lo > hi):
        raise SpecError("every lo must be <= hi in the range [lo, hi]")
    return lo, hi


def quantize(x, scale, zero_point, spec: QuantSpec, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """Integer codes of ``x``: ``clamp(round(x / scale) + zero_point, qmin, qmax)``.

    ``round`` is half to even (``rounding="nearest"``, as ONNX) or ``floor(x / scale + u)`` with
    u ~ U[0, 1) (``rounding="stochastic"``; ``rng`` defaults to one seeded with ``spec.seed``).
    For ``bits=1`` the codes are sign(x) in {-1, +1} (0 maps to +1); stochastic binarization draws +1 with
    probability clip((x / scale + 1) / 2, 0, 1).

    >>> quantize(np.array([0.5, 1.5, 2.5, -300.0]), 1.0, 0, QuantSpec())
    array([   0,    2,    2, -128], dtype=int8)
    """
    if spec.format != "int":
        return formats.get(spec.format).quantize(x, scale, zero_point, spec, rng)
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
    if spec.format != "int":
        return formats.get(spec.format).dequantize(q, scale, zero_point, spec)
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


@formats.register
class IntFormat(formats.Format):
    """Uniform integers: the functions of this module (``bits`` 1..16; 1 is binarization)."""

    name = "int"
    summary = "uniform integer codes, x ~ scale * (q - zero_point)"

    def qparams(self, lo, hi, spec: QuantSpec):
        return qparams(lo, hi, spec)

    def quantize(self, x, scale, zero_point, spec: QuantSpec, rng=None):
        return quantize(x, scale, zero_point, spec, rng=rng)

    def dequantize(self, codes, scale, zero_point, spec: QuantSpec):
        return dequantize(codes, scale, zero_point, spec)

    def label(self, spec: QuantSpec) -> str:
        return "binary" if spec.bits == 1 else f"int{spec.bits}"


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
    if spec.format != "int" and formats.get(spec.format).scale_from_tensor:
        return formats.get(spec.format).tensor_qparams(x, spec)
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
    spec = spec.replace(rounding="nearest")  # the search compares ranges, not draws of a noise
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


def fitted_qparams(x, lo, hi, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """:func:`qparams` of the range ``[lo, hi]`` for the values ``x`` it was fitted to (a weight), laid out as
    ``spec`` says. With ``scale_kind="pow2"`` each slice (tensor, channel or group) takes, of the two powers of two
    around its float scale ``s`` (``2^floor(log2 s)`` and ``2^ceil(log2 s)``), the one with the least
    ``sum((x - fake_quant(x))^2)`` over that slice, instead of always the larger one (which never clips, but
    can leave the grid up to twice as coarse as the range needs). Other scale kinds: :func:`qparams`.

    >>> w = np.array([[0.9, -0.2, 0.1, 0.05], [1.3, 0.01, -0.02, 0.03]], dtype=np.float32)
    >>> spec = QuantSpec(bits=4, axis=0, scale_kind="pow2")
    >>> qparams(-np.abs(w).max(1), np.abs(w).max(1), spec)[0]   # rounded up: 0.9 / 7 -> 1/4, 1.3 / 7 -> 1/4
    array([0.25, 0.25], dtype=float32)
    >>> fitted_qparams(w, -np.abs(w).max(1), np.abs(w).max(1), spec)[0]   # row 0 fits 1/8 better (0.9 -> 0.875)
    array([0.125, 0.25 ], dtype=float32)
    """
    if spec.scale_kind != "pow2" or spec.format != "int" or spec.bits == 1:
        return qparams(lo, hi, spec)
    up_scale, up_zp = qparams(lo, hi, spec)
    lo64 = np.minimum(np.asarray(lo, np.float64), 0.0)
    down_scale = (up_scale / 2).astype(np.float32)
    if spec.symmetric:
        down_zp = up_zp
    else:
        down_zp = np.clip(np.rint(spec.qmin - lo64 / down_scale.astype(np.float64)), spec.qmin, spec.qmax)
        down_zp = down_zp.astype(spec.dtype)
    x = np.asarray(x, dtype=np.float32)
    errors = []
    for scale, zp in ((up_scale, up_zp), (down_scale, down_zp)):
        d = x.astype(np.float64) - fake_quant(x, scale, zp, spec.replace(rounding="nearest"))
        errors.append(layout.reduce(d * d, spec, "sum"))
    down = (errors[1] < errors[0]) & (up_scale > _F32_TINY)
    return np.where(down, down_scale, up_scale).astype(np.float32), np.where(down, down_zp, up_zp).astype(spec.dtype)


def _rows(x: np.ndarray, spec: QuantSpec, fill: float = np.nan):
    """``x`` as a float64 matrix with one row per scale of ``spec`` (a short last group padded with ``fill``), and
    ``(back, rows)``: the maps from one value per row to :func:`layout.param_shape` and the other way."""
    x = np.asarray(x, dtype=np.float64)
    if spec.axis is None:
        return x.reshape(1, -1), (lambda v: np.asarray(v).reshape(())), (lambda p: np.asarray(p).reshape(1))
    axis = layout.normalize_axis(spec.axis, x.ndim)
    if spec.group_size is None:
        return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1), (lambda v: v), (lambda p: np.asarray(p))
    g = spec.group_size
    moved = np.moveaxis(x, axis, -1)
    blocks = -(-moved.shape[-1] // g)
    moved = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, blocks * g - moved.shape[-1])], constant_values=fill)
    grid = (*moved.shape[:-1], blocks)
    return (
        moved.reshape(-1, g),
        lambda v: np.moveaxis(np.asarray(v).reshape(grid), -1, axis),
        lambda p: np.moveaxis(np.asarray(p), axis, -1).reshape(-1),
    )


def percentile_range_per_slice(x, spec: QuantSpec, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """Per slice of ``x`` as ``spec`` lays them out, the range that keeps ``percentile`` percent of its values:
    ``(-a, a)`` with ``a`` the percentile of ``|x|`` on a symmetric grid, else the two tails cut by
    ``(100 - percentile) / 2`` percent each. Returns ``(lo, hi)`` in :func:`~lowbit.core.layout.param_shape`.

    >>> percentile_range_per_slice(np.arange(-50.0, 51.0), QuantSpec(), 90.0)
    (array(-45.), array(45.))
    """
    m, back, _ = _rows(x, spec)
    if spec.symmetric:
        amax = np.nanpercentile(np.abs(m), percentile, axis=1)
        return back(-amax), back(amax)
    cut = (100.0 - percentile) / 2.0
    return back(np.nanpercentile(m, cut, axis=1)), back(np.nanpercentile(m, 100.0 - cut, axis=1))


def admm_range_per_slice(x, spec: QuantSpec, *, start=None, weights=None, max_rounds: int = 50):
    """Per slice of ``x`` as ``spec`` lays them out (per tensor, channel or group), the range whose scale fits its
    own codes best, found by alternating (the ADMM-style fixed point MNN and others use): quantize with the current
    scale and zero point, ``q = clamp(round(x / s) + z)``; fit the scale to those codes by (``weights``-weighted)
    least squares, symmetric ``s = <x, q - z> / <q - z, q - z>``, asymmetric ``x ~ a q + c`` (``s = a``,
    ``z = -c / a``); repeat until the codes stop changing or ``max_rounds`` pass. Starts from ``start`` (``(lo, hi)``
    in :func:`~lowbit.core.layout.param_shape`; default each slice's max range, ``(-max|x|, max|x|)`` on a symmetric
    grid) and keeps per slice the round with the least squared error, so never one worse than the start.
    Rounding is to nearest, whatever ``spec.rounding`` says. Returns ``(lo, hi)`` in param_shape.

    >>> w = np.random.default_rng(0).laplace(size=(3, 1024))   # heavy tails: 4 bits fit better clipped
    >>> lo, hi = admm_range_per_slice(w, QuantSpec(bits=4, axis=0))
    >>> (hi / np.abs(w).max(axis=1)).round(2)
    array([0.74, 0.73, 0.62])
    """
    if spec.format != "int":
        raise SpecError(f"ADMM fits a scale to integer codes; format {spec.format!r} takes another method (max, mse)")
    x = np.asarray(x, dtype=np.float64)
    m, back, rows = _rows(x, spec)
    pad = np.isnan(m)
    w = np.ones_like(m) if weights is None else _rows(np.broadcast_to(weights, x.shape), spec, 0.0)[0]
    m, w = np.where(pad, 0.0, m), np.where(pad, 0.0, w)
    if start is None:
        lo, hi = np.nanmin(np.where(pad, np.nan, m), axis=1), np.nanmax(np.where(pad, np.nan, m), axis=1)
        if spec.symmetric:
            hi = np.maximum(-lo, hi)
            lo = -hi
    else:
        shape = layout.param_shape(x.shape, spec)
        lo, hi = (rows(np.broadcast_to(np.asarray(v, dtype=np.float64), shape)) for v in start)
    grid = spec.replace(axis=0, group_size=None, rounding="nearest")
    best_lo, best_hi, best = lo, hi, np.full(lo.shape, np.inf)
    previous = None
    for _ in range(max(1, int(max_rounds))):
        scale, zero_point = qparams(lo, hi, grid)
        codes = quantize(m.astype(np.float32), scale, zero_point, grid).astype(np.float64)
        z = zero_point.astype(np.float64)[:, None]
        error = (w * ((codes - z) * scale.astype(np.float64)[:, None] - m) ** 2).sum(axis=1)
        better = error < best
        best = np.where(better, error, best)
        best_lo, best_hi = np.where(better, lo, best_lo), np.where(better, hi, best_hi)
        if previous is not None and np.array_equal(codes, previous):
            break
        previous = codes
        lo, hi = _fit_codes(m, w, codes, z, grid, lo, hi)
    return back(best_lo), back(best_hi)


def _fit_codes(x, w, codes, z, spec: QuantSpec, lo, hi):
    """Per row, the range of the scale (and, asymmetric, the zero point) that maps ``codes`` onto ``x`` best in
    weighted least squares; a row whose codes cannot say (all equal, or a scale that is not positive) keeps
    ``(lo, hi)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if spec.symmetric:
            d = codes - z
            s = (w * x * d).sum(axis=1) / (w * d * d).sum(axis=1)
            half = (1 << (spec.bits - 1)) - 1
            ok = np.isfinite(s) & (s > 0)
            return np.where(ok, -s * half, lo), np.where(ok, s * half, hi)
        total = w.sum(axis=1)
        mq, mx = (w * codes).sum(axis=1) / total, (w * x).sum(axis=1) / total
        dq = codes - mq[:, None]
        a = (w * dq * (x - mx[:, None])).sum(axis=1) / (w * dq * dq).sum(axis=1)
        ok = np.isfinite(a) & (a > 0)
        c = mx - a * mq  # x ~ a * codes + c: the grid's ends map to a * qmin + c and a * qmax + c
        return np.where(ok, a * spec.qmin + c, lo), np.where(ok, a * spec.qmax + c, hi)


WEIGHT_METHODS = ("minmax", "mse", "admm")  # how weight_range picks a weight's range from its values
ADMM_STARTS = ("max", "percentile")
_WEIGHT_OPTIONS = {"minmax": (), "mse": ("num_candidates",), "admm": ("start", "percentile", "max_rounds")}


def check_admm_options(start: str = "max", percentile: float = 99.99, max_rounds: int = 50) -> None:
    """A SpecError naming the first bad ADMM option: ``start`` (``"max"`` or ``"percentile"``), ``percentile``
    (in (0, 100]), ``max_rounds`` (a positive integer)."""
    if start not in ADMM_STARTS:
        raise SpecError(f"start must be one of {', '.join(ADMM_STARTS)}, got {start!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0.0 < percentile <= 100.0:
        raise SpecError(f"percentile must be a number in (0, 100], got {percentile!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, (int, np.integer)) or max_rounds < 1:
        raise SpecError(f"max_rounds must be a positive integer, got {max_rounds!r}")


def check_weight_method(method: str, options: dict | None = None) -> None:
    """A SpecError naming what is wrong with a weight ``method`` (:data:`WEIGHT_METHODS`) and its ``options``."""
    if method not in WEIGHT_METHODS:
        raise SpecError(f"unknown weight method {method!r}; weight methods: {', '.join(WEIGHT_METHODS)}")
    for key in options or {}:
        if key not in _WEIGHT_OPTIONS[method]:
            allowed = ", ".join(_WEIGHT_OPTIONS[method]) or "none"
            raise SpecError(f"weight method {method!r} has no option {key!r} (its options: {allowed})")
    if method == "admm":
        check_admm_options(**(options or {}))


def weight_range(w, spec: QuantSpec, method: str = "minmax", options: dict | None = None):
    """The range of a weight per tensor, channel or group (``spec``), from its values by ``method``
    (:data:`WEIGHT_METHODS`): ``minmax`` its own min and max; ``mse`` the shrunk range with the least squared
    error (:func:`mse_range_per_slice`, option ``num_candidates``); ``admm`` the scale fitted to its own codes
    (:func:`admm_range_per_slice`, options ``start`` ``"max"`` or ``"percentile"`` (then from
    :func:`percentile_range_per_slice` at ``percentile``, default 99.99) and ``max_rounds``). Returns ``(lo, hi)``
    in :func:`~lowbit.core.layout.param_shape`; a bad method or option is a SpecError that names it.

    >>> w = np.array([[1.0, -0.5, 0.25], [0.2, 0.1, -0.05]])
    >>> weight_range(w, QuantSpec(axis=0))[1]
    array([1. , 0.2], dtype=float32)
    """
    check_weight_method(method, options)
    options = dict(options or {})
    w = np.asarray(w, dtype=np.float32)
    if method == "mse":
        return mse_range_per_slice(w, spec, **options)
    if method == "admm":
        start = None
        if options.pop("start", "max") == "percentile":
            start = percentile_range_per_slice(w, spec, options.pop("percentile", 99.99))
        options.pop("percentile", None)
        return admm_range_per_slice(w, spec, start=start, **options)
    return layout.reduce(w, spec, "min"), layout.reduce(w, spec, "max")
