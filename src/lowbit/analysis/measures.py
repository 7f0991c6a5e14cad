"""The measures behind an analysis, from arrays and histograms: per-row cosine, output error meters, the SQNR a
calibrator's range gives on a histogram, per-tensor vs per-channel weight error. NumPy only."""

from __future__ import annotations

import math

import numpy as np

from lowbit import calib as calib_registry
from lowbit.analysis.results import MAX_SQNR_DB, POOR_GAP_DB, Error, TensorReport, WeightReport
from lowbit.calib.grid import grid_range
from lowbit.calib.histogram_methods import HistogramCalibrator
from lowbit.core import QuantSpec, fake_quant, qparams, qparams_from_tensor

METHODS = ("minmax", "percentile", "entropy", "mse")  # the thresholds shown on each histogram


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine similarity of each sample (first axis) of ``a`` and ``b``, flattened; 1 where both are zero."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-300))


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Whether each sample (first axis) of ``x`` holds only finite values (no NaN, no infinity)."""
    return np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)


class ErrorMeter:
    """Accumulates :class:`Error` batch by batch: nothing but sums is kept."""

    def __init__(self):
        self.signal = self.noise = self.cos_sum = 0.0
        self.samples = 0
        self.max_abs = 0.0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        a = np.asarray(reference, np.float64)
        b = np.asarray(candidate, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
        if a.ndim == 0:
            a, b = a.reshape(1, 1), b.reshape(1, 1)
        d = a - b
        self.signal += float((a * a).sum())
        self.noise += float((d * d).sum())
        self.max_abs = max(self.max_abs, float(np.abs(d).max(initial=0.0)))
        self.cos_sum += float(cosine_rows(a, b).sum())
        self.samples += a.shape[0]

    def result(self) -> Error:
        if self.noise <= 0:
            sqnr = MAX_SQNR_DB
        elif self.signal <= 0:
            sqnr = -MAX_SQNR_DB
        else:
            sqnr = min(MAX_SQNR_DB, 10 * math.log10(self.signal / self.noise))
        return Error(sqnr, self.cos_sum / max(self.samples, 1), self.max_abs)


def _coarse(h, lo: float, hi: float, bins: int = 128) -> tuple[list[int], list[float]]:
    counts, edges = h.signed()
    keep = np.flatnonzero(counts)
    if keep.size == 0:
        return [int(h.total)], [lo, hi if hi > lo else lo + 1.0]
    counts, edges = counts[keep[0] : keep[-1] + 1], edges[keep[0] : keep[-1] + 2]
    group = max(1, math.ceil(len(counts) / bins))
    pad = (-len(counts)) % group
    counts = np.concatenate([counts, np.zeros(pad, counts.dtype)]).reshape(-1, group).sum(axis=1)
    edges = edges[0] + np.arange(len(counts) + 1) * (edges[1] - edges[0]) * group
    return counts.astype(int).tolist(), edges.astype(float).tolist()


def expected_sqnr_db(h, lo: float, hi: float, spec: QuantSpec) -> float:
    """The SQNR of quantizing the values of histogram ``h`` to range (lo, hi) on grid ``spec``, from the bins."""
    counts, edges = h.signed(group=8)
    keep = counts > 0
    x = ((edges[:-1] + edges[1:]) / 2)[keep]
    c = counts[keep].astype(np.float64)
    scale, zp = qparams(lo, hi, spec)
    err = float((c * (x - fake_quant(x, scale, zp, spec).astype(np.float64)) ** 2).sum())
    signal = float((c * x * x).sum())
    if err <= 0:
        return MAX_SQNR_DB
    return 10 * math.log10(max(signal, 1e-300) / err)


def tensor_report(tensor: str, histogram_cal: HistogramCalibrator, spec: QuantSpec, chosen: str) -> TensorReport:
    """The range each of :data:`METHODS` chooses on the data ``histogram_cal`` saw, for the grid ``spec``, and
    the SQNR each range gives on that data."""
    h = histogram_cal.histogram
    found: dict[str, dict[str, float]] = {}
    for method in METHODS:
        c = calib_registry.create(method, **calib_registry.grid_options(method, spec))
        if isinstance(c, HistogramCalibrator):
            c.histogram, c.num_batches = h, histogram_cal.num_batches
        else:
            c.update(np.array([h.lo, h.hi], np.float32))
        lo, hi = grid_range(c, spec.symmetric)
        found[method] = {"lo": lo, "hi": hi, "sqnr_db": expected_sqnr_db(h, lo, hi, spec)}
    counts, edges = _coarse(h, float(h.lo), float(h.hi))
    return TensorReport(tensor, float(h.lo), float(h.hi), counts, edges, found, chosen)


def _sqnr(w: np.ndarray, spec: QuantSpec) -> float:
    scale, zp = qparams_from_tensor(w, spec)
    d = w.astype(np.float64) - fake_quant(w, scale, zp, spec)
    noise, signal = float((d * d).sum()), float((w.astype(np.float64) ** 2).sum())
    return MAX_SQNR_DB if noise <= 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def weight_report(layer: str, name: str, w: np.ndarray, axis: int, depthwise: bool, fmt: str = "int") -> WeightReport:
    """Per-tensor vs per-channel (along ``axis``) SQNR of weight ``w`` in 8 bits of format ``fmt`` (int8, or an
    FP8 format); its channel ranges where poor."""
    w = np.asarray(w, np.float32)
    per_tensor, per_channel = _sqnr(w, QuantSpec(format=fmt)), _sqnr(w, QuantSpec(axis=axis, format=fmt))
    report = WeightReport(layer, name, depthwise, per_tensor, per_channel, per_channel - per_tensor > POOR_GAP_DB)
    if report.poor:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        report.channel_min = moved.min(axis=1).astype(float).tolist()
        report.channel_max = moved.max(axis=1).astype(float).tolist()
    return report
