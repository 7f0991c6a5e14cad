"""Per-input-channel smoothing: scales ``s`` that move quantization difficulty between a layer's input and its weight.

A linear layer ``y = x W^T`` computes the same with ``x' = x / s`` and ``W' = W * s`` (``s`` per input column, the
division folded into the op that produces ``x`` or kept as a Mul). Two methods choose ``s``:

- **SmoothQuant** (Xiao et al. 2022) for W8A8: activations of transformers have a few channels with outliers 100x
  larger than the rest, which wreck a per-tensor activation scale, while weights are smooth. With
  ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` the outliers migrate into the weights (per-channel weight scales
  absorb them): :func:`smooth_scales`, and :func:`search_alpha` to pick ``alpha`` per layer on the data.
- **AWQ** (Lin et al. 2023) for weight-only INT4: a few input channels carry large activations, and their weights
  matter most; scaling them up before rounding protects them. ``s_j = mean|x_j|^a`` with ``a`` searched on a grid
  in [0, 1] for the least output error of the layer after quantizing ``W * s``: :func:`search_scales`. ``a = 0``
  is plain rounding, so on the calibration rows the result is never worse than plain rounding.

Both read per-channel statistics of the layer's input over the calibration data (:class:`ChannelStats`,
mergeable like the calibrators) and, for the searches, a bounded sample of input rows.

>>> w = np.eye(2, dtype=np.float32)
>>> smooth_scales(np.array([100.0, 1.0]), np.array([1.0, 1.0]), alpha=0.5).tolist()
[10.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

GRID = 20  # points of the search over the exponent (AWQ's a, SmoothQuant's alpha) in [0, 1]
FLOOR = 1e-5  # statistics below FLOOR * their max count as FLOOR * max: a dead channel gets a finite scale


class ChannelStats:
    """Running per-column ``sum|x|``, ``max|x|`` and row count of a layer's input rows (n, columns): AWQ reads
    :attr:`mean_abs`, SmoothQuant :attr:`amax`. Merges exactly (sums add, maxima take the max), so shards of the
    data or processes combine into what one pass would have seen.

    >>> s = ChannelStats()
    >>> s.update(np.array([[1.0, -4.0], [3.0, 0.0]]))
    >>> s.mean_abs.tolist(), s.amax.tolist(), s.count
    ([2.0, 2.0], [3.0, 4.0], 2)
    """

    def __init__(self):
        self.sum_abs: np.ndarray | None = None
        self.max_abs: np.ndarray | None = None
        self.count = 0

    def update(self, rows: np.ndarray) -> None:
        """Fold in ``rows`` (n, columns)."""
        a = np.abs(np.asarray(rows, dtype=np.float64))
        self.add(a.sum(axis=0), a.max(axis=0), a.shape[0])

    def add(self, sum_abs: np.ndarray, max_abs: np.ndarray, count: int) -> None:
        """Fold in statistics already reduced over ``count`` rows (a torch front end reduces on its device)."""
        sum_abs, max_abs = np.asarray(sum_abs, np.float64), np.asarray(max_abs, np.float64)
        if self.sum_abs is None:
            self.sum_abs, self.max_abs = sum_abs.copy(), max_abs.copy()
        elif sum_abs.shape != self.sum_abs.shape:
            raise ValueError(f"rows of {sum_abs.shape[0]} columns, this statistic has {self.sum_abs.shape[0]}")
        else:
            self.sum_abs += sum_abs
            self.max_abs = np.maximum(self.max_abs, max_abs)
        self.count += int(count)

    def merge(self, other: ChannelStats) -> None:
        """Fold in what ``other`` saw."""
        if other.sum_abs is not None:
            self.add(other.sum_abs, other.max_abs, other.count)

    @property
    def mean_abs(self) -> np.ndarray:
        if self.sum_abs is None:
            raise ValueError("no data seen")
        return self.sum_abs / self.count

    @property
    def amax(self) -> np.ndarray:
        if self.max_abs is None:
            raise ValueError("no data seen")
        return self.max_abs


def _floored(v: np.ndarray) -> np.ndarray:
    v = np.abs(np.asarray(v, np.float64))
    top = float(v.max()) if v.size else 0.0
    return np.maximum(v, FLOOR * top if top > 0 else 1.0)


def smooth_scales(act_amax: np.ndarray, weight_amax: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """SmoothQuant's ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` per input column ``j`` (float32);
    ``weight_amax`` is the column's max |w| over every weight that reads the input (q, k and v share one ``s``).
    A column that is zero in the data or in the weights gets ``s = 1``: there is nothing to migrate."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a, w = np.asarray(act_amax, np.float64), np.asarray(weight_amax, np.float64)
    if a.shape != w.shape:
        raise ValueError(f"act_amax {a.shape} and weight_amax {w.shape} must have one value per input column")
    dead = (a <= 0) | (w <= 0)
    s = _floored(a) ** alpha / _floored(w) ** (1.0 - alpha)
    return np.where(dead, 1.0, s).astype(np.float32)


def columns_amax(weights: Sequence[np.ndarray]) -> np.ndarray:
    """max |w| per input column over the matrices (rows_i, columns) that read one input."""
    return np.max([np.abs(np.asarray(w, np.float64)).max(axis=0) for w in weights], axis=0)


def output_error(
    weights: Sequence[np.ndarray],
    x: np.ndarray,
    s: np.ndarray,
    quantize_weight: Callable[[np.ndarray], np.ndarray],
    quantize_input: Callable[[np.ndarray], np.ndarray] | None = None,
) -> float:
    """Mean square, over rows and outputs of every matrix, of ``x W^T - q_x(x / s) q_w(W * s)^T``."""
    x = np.asarray(x, np.float64)
    xs = x / s
    if quantize_input is not None:
        xs = np.asarray(quantize_input(xs.astype(np.float32)), np.float64)
    total, n = 0.0, 0
    for w in weights:
        w = np.asarray(w, np.float64)
        wq = np.asarray(quantize_weight((w * s).astype(np.float32)), np.float64)
        d = x @ w.T - xs @ wq.T
        total += float(np.sum(d * d))
        n += d.size
    return total / max(n, 1)


@dataclass(frozen=True)
class Search:
    """The scales a search chose (``x' = x / scales``, ``W' = W * scales``), its exponent, the output error with
    them, and the error with no scaling (``scales = 1``) for comparison."""

    scales: np.ndarray
    exponent: float
    error: float
    plain_error: float


def search_scales(
    weights: Sequence[np.ndarray],
    x: np.ndarray,
    quantize_weight: Callable[[np.ndarray], np.ndarray],
    mean_abs: np.ndarray | None = None,
    grid: int = GRID,
) -> Search:
    """AWQ: ``s = m^a / sqrt(max(m^a) min(m^a))`` with ``m`` the input's per-column mean |x| (``mean_abs``, over the
    whole calibration data; default: over ``x``), ``a`` on ``grid`` points in [0, 1), chosen for the least
    :func:`output_error` on the sample rows ``x`` (n, columns) after ``quantize_weight`` (the weight's own
    fake quantization, e.g. per-group INT4) of every matrix in ``weights`` (rows_i, columns). The normalisation
    keeps ``s`` around 1 (the weights' range, and so their scales, barely move). ``a = 0`` is plain rounding."""
    m = _floored(np.abs(x).mean(axis=0) if mean_abs is None else mean_abs)
    best: tuple[float, float, np.ndarray] | None = None
    plain = None
    for a in np.arange(grid) / grid:
        s = m**a
        s = s / np.sqrt(s.max() * s.min())
        err = output_error(weights, x, s, quantize_weight)
        if a == 0:
            plain = err
        if best is None or err < best[0]:
            best = (err, float(a), s)
    return Search(best[2].astype(np.float32), best[1], best[0], plain)


def search_alpha(
    weights: Sequence[np.ndarray],
    x: np.ndarray,
    quantize_weight: Callable[[np.ndarray], np.ndarray],
    quantize_input: Callable[[np.ndarray], np.ndarray],
    act_amax: np.ndarray | None = None,
    grid: int = GRID,
) -> Search:
    """SmoothQuant with ``alpha`` searched per layer: :func:`smooth_scales` for ``alpha`` on ``grid + 1`` points in
    [0, 1], chosen for the least :func:`output_error` with both the input (``quantize_input``, applied to
    ``x / s``; it should re-fit its range to the smoothed input) and the weights quantized. ``alpha = 0`` is close
    to no smoothing but not equal to it (``s = 1 / max|W_j|``); ``plain_error`` is the error with ``s = 1``."""
    amax = np.abs(x).max(axis=0) if act_amax is None else act_amax
    wmax = columns_amax(weights)
    plain = output_error(weights, x, np.ones(x.shape[1]), quantize_weight, quantize_input)
    best = (plain, float("nan"), np.ones(x.shape[1], np.float32))
    for alpha in np.arange(grid + 1) / grid:
        s = smooth_scales(amax, wmax, float(alpha))
        err = output_error(weights, x, s, quantize_weight, quantize_input)
        if err < best[0]:
            best = (err, float(alpha), s)
    return Search(best[2].astype(np.float32), best[1], best[0], plain)
