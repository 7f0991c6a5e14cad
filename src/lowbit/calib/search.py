"""Threshold searches over a histogram: entropy (TensorRT's KL method), percentile and MSE.

Pure functions of counts, so that analysis code can ask every method for its threshold on one histogram.
"""

from __future__ import annotations

import numpy as np

from lowbit.core import QuantSpec, admm_range_per_slice, fake_quant, qparams

_CHUNK = 96  # candidates per block: 96 x 129 float64 = 99 kB, below glibc's mmap threshold, cache-resident


def _xlogx(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def kl_divergences(hist, num_levels: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of TensorRT's entropy calibration, as NVIDIA's open toolkits compute it, for every candidate
    number of bins i.

    ``hist`` counts |x| in equal bins starting at 0. For each i in num_levels..len(hist):
      P = hist[:i] with every outlier (bins >= i) added to bin i - 1;
      Q = hist[:i] merged into ``num_levels`` levels (bin j goes to level floor(j * num_levels / i)), each
          level's mass spread evenly over its bins that are non-empty in ``hist`` (the others stay empty: so
          a last bin that is empty in ``hist`` but holds the outliers in P gives KL = +inf);
      both normalised; KL = sum over P > 0 of p * log(p / q), +inf where q = 0 < p.

    All candidates at once: with prefix sums C (counts), HL (h log h) and Z (non-empty bins),
      KL(i) = [HL(i-1) + P_{i-1} log P_{i-1} - sum_l PL_l (log M_l - log c_l)] / T - log T + log C(i)
    where M_l is level l's mass in hist, PL_l its mass in P and c_l its count of non-empty bins.
    Returns (candidates, divergences); the candidate i means the threshold at the upper edge of bin i - 1.
    """
    h = np.asarray(hist, dtype=np.float64)
    n = h.size
    levels = int(num_levels)
    if n < levels or not h.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    i = np.arange(levels, n + 1)
    total = h.sum()
    c_sum = np.concatenate([[0.0], np.cumsum(h)])
    hl_sum = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    nz_sum = np.concatenate([[0], np.cumsum(h > 0)])

    # Chunks of candidates keep the (candidates x levels) temporaries small enough to stay in cache.
    kl = np.empty(i.size)
    for start in range(0, i.size, _CHUNK):
        kl[start : start + _CHUNK] = _kl_chunk(i[start : start + _CHUNK], levels, total, c_sum, hl_sum, h, nz_sum)
    return i, kl


def _kl_chunk(i, levels, total, c_sum, hl_sum, h, nz_sum) -> np.ndarray:
    """KL(i) for a block of candidates; see :func:`kl_divergences` for the formula."""
    outliers = total - c_sum[i]
    p_last = h[i - 1] + outliers  # bin i-1 plus every outlier
    sum_plogp = hl_sum[i - 1] + _xlogx(p_last)
    # Level l of candidate i holds bins [ceil(l * i / L), ceil((l + 1) * i / L)).
    bounds = i[:, None] * np.arange(levels + 1)[None, :] + (levels - 1)
    if levels & (levels - 1) == 0:
        bounds >>= levels.bit_length() - 1
    else:
        bounds //= levels
    mass = np.diff(np.take(c_sum, bounds), axis=1)
    count = np.diff(np.take(nz_sum, bounds), axis=1)
    # log M_l where the level has mass (0 elsewhere: those terms carry no P mass), log c_l from a table.
    log_ratio = np.zeros_like(mass)
    np.log(mass, out=log_ratio, where=mass > 0)
    log_count = np.log(np.maximum(np.arange(int(count.max()) + 1), 1))
    log_ratio -= np.take(log_count, count)
    p_mass = mass  # from here on: the level masses of P, whose last level also holds the outliers
    p_mass[:, -1] += outliers
    term = np.einsum("ij,ij->i", p_mass, log_ratio)
    with np.errstate(divide="ignore"):
        kl = (sum_plogp - term) / total - np.log(total) + np.log(c_sum[i])
    return np.where((h[i - 1] == 0) & (outliers > 0), np.inf, kl)


# Divergences within this relative distance of the least are ties (the closed form rounds differently from a loop).
TIE = 1e-10


def nvidia_zero_bin(hist) -> np.ndarray:
    """``hist`` (float64) with bin 0 given bin 1's count, as NVIDIA's entropy calibration does before its search:
    the spike of exact zeros after a ReLU then weighs no more than its neighbour."""
    h = np.array(hist, dtype=np.float64)
    if h.size > 1:
        h[0] = h[1]
    return h


def entropy_bins(hist, num_levels: int = 128) -> int:
    """The number of bins TensorRT's entropy calibration keeps, as NVIDIA's toolkits choose it
    (pytorch-quantization and ModelOpt, ``_compute_amax_entropy``): bin 0 takes bin 1's count
    (:func:`nvidia_zero_bin`), then the candidate with the least KL (:func:`kl_divergences`), the last one on
    ties (:func:`least_divergence`)."""
    h = nvidia_zero_bin(hist)
    return least_divergence(*kl_divergences(h, num_levels), h.size)


def least_divergence(candidates: np.ndarray, divergences: np.ndarray, num_bins: int) -> int:
    """The candidate with the least divergence, the last (widest) one on ties; ``num_bins`` (keep everything) when
    there is no candidate or none is finite."""
    if not candidates.size or not np.isfinite(divergences).any():
        return int(num_bins)
    least = divergences.min()
    return int(candidates[np.flatnonzero(divergences <= least + TIE * abs(least))[-1]])


def entropy_amax(hist, width: float, *, num_levels: int = 128, amax: float | None = None) -> float:
    """The threshold TensorRT's entropy calibration picks on ``hist`` (bins of ``width`` from 0): the upper edge of
    the bins :func:`entropy_bins` keeps. ``amax`` (the true max|x|) caps the result, since the last non-empty bin
    may reach past it.

    >>> hist = np.r_[5000.0, np.linspace(1000, 1, 300), np.zeros(700), [1.0]]   # zeros, a tail, an outlier
    >>> entropy_amax(hist, 0.01)   # the outlier folds into the tail's last bin; the zeros do not count
    3.0
    """
    threshold = entropy_bins(hist, num_levels) * float(width)
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
    """The range whose scale fits the histogram's own codes best: :func:`lowbit.core.admm_range_per_slice` on the
    bin centres (clipped to the observed range) as one slice, each weighted by its count. It alternates quantizing
    with the current scale and zero point, ``q = clamp(round(x / s) + z)``, and the weighted least-squares fit of
    the scale to those codes (symmetric: ``s = <x, q - z> / <q - z, q - z>``; asymmetric: ``x ~ a q + c``) until
    the codes stop changing or ``max_rounds`` pass. Starts from ``start`` (default the observed range, as MinMax)
    and returns the range of the round with the least squared error, so never one worse than the start.

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
    if start is None:
        amax = max(-lo, hi)
        start = (-amax, amax) if spec.symmetric else (lo, hi)
    grid = spec.replace(axis=None, group_size=None)
    best_lo, best_hi = admm_range_per_slice(x, grid, start=start, weights=counts[keep], max_rounds=max_rounds)
    return float(best_lo), float(best_hi)
