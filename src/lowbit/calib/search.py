"""Threshold searches over a histogram: entropy (TensorRT's KL method), percentile and MSE.

Pure functions of counts, so that analysis code can ask every method for its threshold on one histogram.
"""

from __future__ import annotations

import numpy as np

from lowbit.core import QuantSpec, fake_quant, qparams, quantize

_CHUNK = 96  # candidates per block: 96 x 129 float64 = 99 kB, below glibc's mmap threshold, cache-resident


def _xlogx(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def kl_divergences(hist, num_levels: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of TensorRT's entropy calibration for every candidate number of bins i.

    ``hist`` counts |x| in equal bins starting at 0. For each i in num_levels..len(hist):
      P = hist[:i] with every outlier (bins >= i) added to bin i - 1;
      Q = hist[:i] merged into ``num_levels`` levels (bin j goes to level floor(j * num_levels / i)),
          each level's mass spread evenly over the bins where P is non-zero (empty bins stay empty);
      both normalised; KL = sum over P > 0 of p * log(p / q), +inf where q = 0 < p.

    All candidates at once: with prefix sums C (counts), HL (h log h) and Z (non-zero bins),
      KL(i) = [HL(i-1) + P_{i-1} log P_{i-1} - sum_l PL_l (log M_l - log c_l)] / T - log T + log C(i)
    where M_l is level l's mass in hist, PL_l its mass in P and c_l its count of non-zero P bins.
    Returns (candidates, divergences); the candidate i means the threshold at the upper edge of bin i - 1.
    """
    h = np.asarray(hist, dtype=np.float64)
    nonzero = np.flatnonzero(h)
    n = int(nonzero[-1]) + 1 if nonzero.size else 0
    levels = int(num_levels)
    if n < levels:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    h = h[:n]
    i = np.arange(levels, n + 1)
    total = h.sum()
    c_sum = np.concatenate([[0.0], np.cumsum(h)])
    hl_sum = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    nz = h > 0
    nz_sum = np.concatenate([[0], np.cumsum(nz)])

    # Chunks of candidates keep the (candidates x levels) temporaries small enough to stay in cache.
    kl = np.empty(i.size)
    for start in range(0, i.size, _CHUNK):
        kl[start : start + _CHUNK] = _kl_chunk(i[start : start + _CHUNK], levels, total, c_sum, hl_sum, nz, nz_sum)
    return i, kl


def _kl_chunk(i, levels, total, c_sum, hl_sum, nz, nz_sum) -> np.ndarray:
    """KL(i) for a block of candidates; see :func:`kl_divergences` for the formula."""
    p_last = total - c_sum[i - 1]  # bin i-1 plus every outlier
    sum_plogp = hl_sum[i - 1] + _xlogx(p_last)
    # Level l of candidate i holds bins [ceil(l * i / L), ceil((l + 1) * i / L)).
    bounds = i[:, None] * np.arange(levels + 1)[None, :] + (levels - 1)
    if levels & (levels - 1) == 0:
        bounds >>= levels.bit_length() - 1
    else:
        bounds //= levels
    mass = np.diff(np.take(c_sum, bounds), axis=1)
    count = np.diff(np.take(nz_sum, bounds), axis=1)
    # Bin i-1 lies in the last level; there P's non-zero test replaces hist's.
    count[:, -1] += (p_last > 0).astype(count.dtype) - nz[i - 1]
    # log M_l where the level has mass (0 elsewhere: those terms carry no P mass), log c_l from a table.
    mass_last_empty = mass[:, -1] == 0
    log_ratio = np.zeros_like(mass)
    np.log(mass, out=log_ratio, where=mass > 0)
    log_count = np.log(np.maximum(np.arange(int(count.max()) + 1), 1))
    log_ratio -= np.take(log_count, count)
    p_mass = mass  # from here on: the level masses of P, whose last level also holds the outliers
    p_mass[:, -1] += total - c_sum[i]
    term = np.einsum("ij,ij->i", p_mass, log_ratio)
    with np.errstate(divide="ignore"):
        kl = (sum_plogp - term) / total - np.log(total) + np.log(c_sum[i])
    return np.where(mass_last_empty & (p_mass[:, -1] > 0), np.inf, kl)


def entropy_amax(hist, width: float, *, num_levels: int = 128, amax: float | None = None) -> float:
    """The threshold TensorRT's entropy calibration picks: the upper edge of the candidate with the least KL.

    ``amax`` (the true max|x|) caps the result, since the last non-empty bin may reach past it.
    A histogram narrower than ``num_levels`` bins needs no clipping: its upper edge is returned.
    """
    candidates, divergences = kl_divergences(hist, num_levels)
    if candidates.size:
        threshold = float(candidates[int(np.argmin(divergences))]) * width
    else:
        nonzero = np.flatnonzero(np.asarray(hist))
        threshold = (int(nonzero[-1]) + 1) * width if nonzero.size else 0.0
    return threshold if amax is None else min(threshold, float(amax))


def rebin(hist, width: float, amax: float, bins: int) -> np.ndarray:
    """Counts of |x| on ``bins`` equal bins over [0, amax], from a finer histogram of bin ``width``.

    Each fine bin's count is spread evenly over its span (the last one ends at amax, the true maximum),
    i.e. the cumulative count is interpolated linearly at the new edges.
    """
    hist = np.asarray(hist, dtype=np.float64)
    if amax <= 0 or hist.size == 0:
        out = np.zeros(bins)
        out[0] = hist.sum()
        return out
    fine_edges = np.arange(hist.size + 1, dtype=np.float64) * width
    fine_edges[-1] = max(min(fine_edges[-1], amax), fine_edges[-2])
    cumulative = np.concatenate([[0.0], np.cumsum(hist)])
    coarse = np.interp(np.linspace(0.0, amax, bins + 1), fine_edges, cumulative)
    return np.maximum(np.diff(coarse), 0.0)


def quantile(counts, edges, q: float) -> float:
    """The value below which a fraction ``q`` of the counted mass lies, interpolated inside its bin."""
    counts = np.asarray(counts, dtype=np.float64)
    cum = np.cumsum(counts)
    total = cum[-1] if cum.size else 0.0
    if total <= 0:
        return 0.0
    target = q * total
    nonzero = np.flatnonzero(counts)
    if target <= 0:
        return float(edges[nonzero[0]])
    k = min(int(np.searchsorted(cum, target, side="left")), len(counts) - 1)
    before = cum[k] - counts[k]
    frac = (target - before) / counts[k] if counts[k] > 0 else 1.0
    return float(edges[k] + min(max(frac, 0.0), 1.0) * (edges[k + 1] - edges[k]))


def percentile_amax(hist, width: float, percentile: float, *, amax: float | None = None) -> float:
    """The ``percentile`` of |x|: the symmetric threshold that keeps that share of the values unclipped."""
    hist = np.asarray(hist)
    edges = np.arange(len(hist) + 1, dtype=np.float64) * width
    threshold = quantile(hist, edges, percentile / 100.0)
    return threshold if amax is None else min(threshold, float(amax))


def percentile_range(counts, edges, percentile: float, *, lo: float, hi: float) -> tuple[float, float]:
    """Two-sided percentile: cut (100 - percentile) / 2 percent of the values on each side."""
    cut = (100.0 - percentile) / 200.0
    return max(quantile(counts, edges, cut), lo), min(quantile(counts, edges, 1.0 - cut), hi)


def mse_range(
    counts, edges, spec: QuantSpec, *, lo: float, hi: float, num_candidates: int = 256
) -> tuple[float, float]:
    """The range that minimises the expected squared error of quantizing the histogram with ``spec``.

    Candidates shrink the observed range by a = k / num_candidates, k = 1..num_candidates: [-a * amax, a * amax]
    for a symmetric spec, [a * lo, a * hi] otherwise. Each bin is represented by its centre (clipped to the
    observed range) and weighted by its count; rounding is to nearest, whatever ``spec.rounding`` says.
    """
    counts = np.asarray(counts, dtype=np.float64)
    keep = counts > 0
    if not keep.any() or max(-lo, hi) <= 0:
        return 0.0, 0.0
    centres = np.clip((edges[:-1] + edges[1:])[keep] / 2.0, lo, hi).astype(np.float32)
    weights = counts[keep]
    alphas = np.arange(1, num_candidates + 1, dtype=np.float64) / num_candidates
    if spec.symmetric:
        amax = max(-lo, hi)
        cand_lo, cand_hi = -alphas * amax, alphas * amax
    else:
        cand_lo, cand_hi = alphas * lo, alphas * hi
    cand_spec = spec.replace(axis=0, group_size=None, rounding="nearest")
    scale, zero_point = qparams(cand_lo, cand_hi, cand_spec)
    errors = np.empty(num_candidates)
    rows = max(1, (1 << 21) // centres.size)  # bound the temporaries to a few MB
    for start in range(0, num_candidates, rows):
        stop = min(start + rows, num_candidates)
        grid = np.broadcast_to(centres, (stop - start, centres.size))
        fq = fake_quant(grid, scale[start:stop], zero_point[start:stop], cand_spec)
        errors[start:stop] = ((fq.astype(np.float64) - centres) ** 2 * weights).sum(axis=1)
    best = int(np.argmin(errors))
    return float(cand_lo[best]), float(cand_hi[best])


def admm_range(
    counts,
    edges,
    spec: QuantSpec,
    *,
    lo: float,
    hi: float,
    start: tuple[float, float] | None = None,
    max_rounds: int = 50,
) -> tuple[float, float]:
    """The range whose scale fits the histogram's own codes best, found by alternating (the ADMM-style fixed point
    MNN and others use): quantize every bin centre with the current range's scale and zero point,
    ``q = clamp(round(x / s) + z)``; fit the scale to those codes by weighted least squares (symmetric:
    ``s = <x, q - z> / <q - z, q - z>``; asymmetric: ``x ~ a q + c``, so ``s = a`` and ``z = -c / a``); repeat
    until the codes stop changing or ``max_rounds`` pass. Starts from ``start`` (default the observed range, as
    MinMax) and returns the range of the round with the least squared error, so never one worse than the start.

    >>> edges = np.linspace(-4, 4, 801); centres = (edges[1:] + edges[:-1]) / 2
    >>> counts = np.exp(-centres ** 2 / 2) * 1e4
    >>> lo, hi = admm_range(counts, edges, QuantSpec(bits=4), lo=-4.0, hi=4.0)
    >>> bool(hi < 4.0)   # a 4-bit grid over a Gaussian fits better clipped than over the whole range
    True
    """
    counts = np.asarray(counts, dtype=np.float64)
    keep = counts > 0
    if not keep.any() or max(-lo, hi) <= 0:
        return 0.0, 0.0
    x = np.clip((edges[:-1] + edges[1:])[keep] / 2.0, lo, hi)
    w = counts[keep]
    grid = spec.replace(axis=None, group_size=None, rounding="nearest")
    amax = max(-lo, hi)
    current = start if start is not None else ((-amax, amax) if spec.symmetric else (lo, hi))
    best_error, best = np.inf, current
    previous = None
    for _ in range(max(1, int(max_rounds))):
        scale, zero_point = qparams(current[0], current[1], grid)
        codes = quantize(x.astype(np.float32), scale, zero_point, grid).astype(np.float64)
        error = float((w * ((codes - float(zero_point)) * float(scale) - x) ** 2).sum())
        if error < best_error:
            best_error, best = error, current
        if previous is not None and np.array_equal(codes, previous):
            break
        previous = codes
        fitted = _fit_range(x, w, codes, float(zero_point), grid)
        if fitted is None:
            break
        current = fitted
    return float(best[0]), float(best[1])


def _fit_range(x, w, codes, zero_point: float, spec: QuantSpec) -> tuple[float, float] | None:
    """The range of the scale (and, asymmetric, the zero point) that maps ``codes`` onto ``x`` best in weighted
    least squares; None when the codes cannot say (all equal, or a scale that is not positive)."""
    if spec.symmetric:
        d = codes - zero_point
        den = float((w * d * d).sum())
        s = float((w * x * d).sum()) / den if den > 0 else 0.0
        half = (1 << (spec.bits - 1)) - 1
        return (-s * half, s * half) if s > 0 else None
    total = w.sum()
    mq, mx = (w * codes).sum() / total, (w * x).sum() / total
    var = float((w * (codes - mq) ** 2).sum())
    a = float((w * (codes - mq) * (x - mx)).sum()) / var if var > 0 else 0.0
    if a <= 0:
        return None
    c = mx - a * mq  # x ~ a * codes + c: the grid's ends map to a * qmin + c and a * qmax + c
    return a * spec.qmin + c, a * spec.qmax + c
