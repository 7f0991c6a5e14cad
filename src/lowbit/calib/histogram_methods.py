"""Calibrators that read one streaming :class:`Histogram`: ``percentile``, ``entropy``, ``mse`` and ``admm``."""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.calib import search
from lowbit.calib.base import Calibrator, Range, register
from lowbit.calib.histogram import Histogram
from lowbit.core import QuantSpec, check_admm_options
from lowbit.errors import CalibrationError, SpecError

# Bins over [0, max|x|] of the internal grid (between GRID_BINS and 2 * GRID_BINS; 256 kB of counts a
# tensor): fine enough that every method reads it as if it were continuous.
GRID_BINS = 8192
# MSE reads bins 8 at a time (1024..2048 bins over the data): as accurate for the error, 8x less work.
_MSE_GROUP = 8


class HistogramCalibrator(Calibrator):
    """Base of the histogram methods: per tensor, raw values never kept, exact merges.

    The statistics are one :class:`Histogram` on a fine power-of-two grid (see :mod:`lowbit.calib.histogram`);
    each method reads what it needs from it when ``compute()`` is called.
    """

    def __init__(self, *, tensor: str | None = None, skip_nonfinite: bool = False):
        super().__init__(tensor=tensor, skip_nonfinite=skip_nonfinite)
        self.histogram = Histogram(GRID_BINS)

    @property
    def observed(self) -> Range:
        """The true min and max seen, whatever range the method chooses."""
        return Range(self.histogram.lo, self.histogram.hi)

    def _update(self, x: np.ndarray) -> None:
        if x.dtype.kind != "f" or x.dtype.itemsize < 4:
            x = x.astype(np.float32)
        lo, hi = x.min(), x.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            x = x[self._nonfinite(x)]
            if x.size == 0:
                return
            lo, hi = x.min(), x.max()
        self.histogram.update(x, lo, hi)

    def _merge(self, other: Calibrator) -> None:
        assert isinstance(other, HistogramCalibrator)
        self.histogram.merge(other.histogram)

    def _reset(self) -> None:
        self.histogram.reset()

    def _state(self) -> dict[str, Any]:
        return self.histogram.state_dict()

    def _load(self, state: dict[str, np.ndarray]) -> None:
        try:
            self.histogram.load_state_dict(state)
        except (KeyError, ValueError) as exc:
            raise CalibrationError(f"{self.describe()}: bad histogram state: {exc}") from None

    def compute(self) -> Range:
        if self.num_batches and self.histogram.total == 0:
            raise CalibrationError(f"{self.describe()}: every value seen was NaN or Inf; there is nothing to calibrate")
        return super().compute()


@register("percentile")
class PercentileCalibrator(HistogramCalibrator):
    """Clip the rarest values: the ``percentile`` of |x| as a symmetric threshold (default), or with
    ``symmetric=False`` cut (100 - percentile) / 2 percent of the values on each side.

    >>> c = PercentileCalibrator(percentile=99.0)
    >>> c.update(np.arange(1, 1001, dtype=np.float32))
    >>> round(c.compute().hi)
    990
    """

    def __init__(
        self,
        *,
        percentile: float = 99.99,
        symmetric: bool = True,
        tensor: str | None = None,
        skip_nonfinite: bool = False,
    ):
        super().__init__(tensor=tensor, skip_nonfinite=skip_nonfinite)
        if not 0.0 < float(percentile) <= 100.0:
            raise CalibrationError(f"{self.describe()}: percentile must be in (0, 100], got {percentile!r}")
        self.percentile = float(percentile)
        self.symmetric = bool(symmetric)

    def _compute(self) -> Range:
        return percentile_of(self.histogram, self.percentile, self.symmetric)


def percentile_of(h: Histogram, percentile: float, symmetric: bool) -> Range:
    """The ``percentile`` range of the values ``h`` counts: (-a, a) with ``a`` the percentile of |x| when
    ``symmetric``, else both tails cut by (100 - percentile) / 2 percent."""
    if symmetric:
        amax = search.percentile_amax(h.magnitude(), h.width, percentile, amax=h.amax)
        return Range(-amax, amax)
    counts, edges = h.signed()
    return Range(*search.percentile_range(counts, edges, percentile, lo=h.lo, hi=h.hi))


@register("entropy")
class EntropyCalibrator(HistogramCalibrator):
    """TensorRT's entropy calibration as NVIDIA's own toolkits compute it (pytorch-quantization and ModelOpt):
    the threshold whose 8-bit quantization loses the least information, measured by KL(P || Q) over a
    histogram of |x|. Returns (-amax, amax).

    A histogram of ``num_bins`` bins over [0, max|x|] (re-binned from the fine streaming grid), bin 0 given bin
    1's count (the spike of exact zeros after a ReLU weighs no more than its neighbour), candidates
    ``num_levels``..num_bins, ``num_levels`` quantized levels, the last candidate on ties: see
    :func:`search.kl_divergences` and :func:`search.entropy_bins`.

    ``exclude_zeros=True`` empties bin 0 instead (the zeros, and values within one bin of zero, leave the
    divergence altogether).

    >>> rng = np.random.default_rng(0)
    >>> c = EntropyCalibrator()
    >>> c.update(rng.standard_normal(100_000))
    >>> 3.0 < c.compute().hi < c.observed.hi
    True
    """

    def __init__(
        self,
        *,
        num_bins: int = 2048,
        num_levels: int = 128,
        exclude_zeros: bool = False,
        tensor: str | None = None,
        skip_nonfinite: bool = False,
    ):
        super().__init__(tensor=tensor, skip_nonfinite=skip_nonfinite)
        if not isinstance(exclude_zeros, (bool, np.bool_)):
            raise CalibrationError(f"{self.describe()}: exclude_zeros must be True or False, got {exclude_zeros!r}")
        self.exclude_zeros = bool(exclude_zeros)
        if not isinstance(num_bins, (int, np.integer)) or isinstance(num_bins, bool) or not 8 <= num_bins <= GRID_BINS:
            raise CalibrationError(
                f"{self.describe()}: num_bins must be an integer from 8 to {GRID_BINS}, got {num_bins!r}"
            )
        if not isinstance(num_levels, (int, np.integer)) or not 2 <= num_levels <= num_bins:
            raise CalibrationError(
                f"{self.describe()}: num_levels must be an integer from 2 to num_bins ({num_bins}), got {num_levels!r}"
            )
        self.num_bins = int(num_bins)
        self.num_levels = int(num_levels)

    def trt_histogram(self) -> tuple[np.ndarray, float]:
        """The histogram the search reads: ``num_bins`` counts over [0, max|x|] with bin 0 given bin 1's count
        (emptied with ``exclude_zeros``), and the bin width."""
        h = self.histogram
        hist = search.nvidia_zero_bin(search.rebin(h.magnitude(), h.width, h.amax, self.num_bins))
        if self.exclude_zeros and hist[1:].sum() > 0:
            hist[0] = 0.0
        return hist, h.amax / self.num_bins

    def divergences(self) -> tuple[np.ndarray, np.ndarray]:
        """(thresholds, KL divergences) of every candidate, for plots and analysis."""
        hist, width = self.trt_histogram()
        candidates, kl = search.kl_divergences(hist, self.num_levels)
        return candidates * width, kl

    def _compute(self) -> Range:
        hist, width = self.trt_histogram()
        kept = search.least_divergence(*search.kl_divergences(hist, self.num_levels), hist.size)
        amax = min(kept * width, self.histogram.amax)
        return Range(-amax, amax)


class GridCalibrator(HistogramCalibrator):
    """Base of the methods that fit a range to one integer grid, ``spec`` (a per-tensor :class:`QuantSpec` of
    2 bits or more, or its dict; default int8 symmetric): ``mse`` and ``admm``."""

    fit = "the grid fit"  # what messages call the method

    def __init__(
        self, *, spec: QuantSpec | dict | None = None, tensor: str | None = None, skip_nonfinite: bool = False
    ):
        super().__init__(tensor=tensor, skip_nonfinite=skip_nonfinite)
        try:
            spec = QuantSpec() if spec is None else spec if isinstance(spec, QuantSpec) else QuantSpec.from_dict(spec)
        except (SpecError, TypeError) as exc:
            raise CalibrationError(f"{self.describe()}: bad spec: {exc}") from None
        if spec.axis is not None or spec.bits < 2:
            raise CalibrationError(
                f"{self.describe()}: {self.fit} needs a per-tensor spec of 2 bits or more, got {spec}"
            )
        self.spec = spec


@register("mse")
class MSECalibrator(GridCalibrator):
    """The range that minimises the expected squared quantization error for ``spec`` (a per-tensor
    :class:`QuantSpec` or its dict; default int8 symmetric), searched over ``num_candidates`` shrinkings of
    the observed range. Symmetric specs give (-amax, amax).

    >>> rng = np.random.default_rng(0)
    >>> c = MSECalibrator(spec=QuantSpec(bits=4))
    >>> c.update(rng.standard_normal(100_000))
    >>> 2.0 < c.compute().hi < 3.5
    True
    """

    fit = "the MSE search"

    def __init__(
        self,
        *,
        spec: QuantSpec | dict | None = None,
        num_candidates: int = 256,
        tensor: str | None = None,
        skip_nonfinite: bool = False,
    ):
        super().__init__(spec=spec, tensor=tensor, skip_nonfinite=skip_nonfinite)
        if not isinstance(num_candidates, (int, np.integer)) or num_candidates < 1:
            raise CalibrationError(
                f"{self.describe()}: num_candidates must be a positive integer, got {num_candidates!r}"
            )
        self.num_candidates = int(num_candidates)

    def _compute(self) -> Range:
        h = self.histogram
        counts, edges = h.signed(group=_MSE_GROUP)
        lo, hi = search.mse_range(counts, edges, self.spec, lo=h.lo, hi=h.hi, num_candidates=self.num_candidates)
        return Range(lo, hi)


@register("admm")
class ADMMCalibrator(GridCalibrator):
    """The range whose scale fits its own codes best for ``spec`` (default int8 symmetric): alternate quantizing
    the histogram's bin centres (weighted by their counts) and fitting the scale in closed form until the codes
    stop changing (:func:`lowbit.calib.search.admm_range`; at most ``max_rounds``). ``start="max"`` (default)
    starts from the observed range (MinMax's), ``start="percentile"`` from the ``percentile`` range (what
    ``PercentileCalibrator`` with that percentile returns). Its squared error is never above its start's.

    >>> rng = np.random.default_rng(0)
    >>> c = ADMMCalibrator(spec=QuantSpec(bits=4))
    >>> c.update(rng.standard_normal(100_000))
    >>> 1.5 < c.compute().hi < 4.0
    True
    """

    fit = "the ADMM fit"

    def __init__(
        self,
        *,
        spec: QuantSpec | dict | None = None,
        start: str = "max",
        percentile: float = 99.99,
        max_rounds: int = 50,
        tensor: str | None = None,
        skip_nonfinite: bool = False,
    ):
        super().__init__(spec=spec, tensor=tensor, skip_nonfinite=skip_nonfinite)
        try:
            check_admm_options(start, percentile, max_rounds)
        except SpecError as exc:
            raise CalibrationError(f"{self.describe()}: {exc}") from None
        self.start, self.percentile, self.max_rounds = start, float(percentile), int(max_rounds)

    def _compute(self) -> Range:
        h = self.histogram
        start = None
        if self.start == "percentile":
            start = tuple(percentile_of(h, self.percentile, self.spec.symmetric))
        counts, edges = h.signed(group=_MSE_GROUP)
        lo, hi = search.admm_range(counts, edges, self.spec, lo=h.lo, hi=h.hi, start=start, max_rounds=self.max_rounds)
        return Range(lo, hi)
