"""Range calibrators that need only the min and max of each batch: ``minmax`` and ``ema``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lowbit.calib.base import Calibrator, Range, register
from lowbit.core import normalize_axis
from lowbit.errors import CalibrationError


class _BatchRange(Calibrator):
    """Shared by minmax and ema: per-batch min/max, per tensor or per slice along ``axis``."""

    def __init__(self, *, axis: int | None = None, tensor: str | None = None, skip_nonfinite: bool = False):
        super().__init__(tensor=tensor, skip_nonfinite=skip_nonfinite)
        if axis is not None and (not isinstance(axis, (int, np.integer)) or isinstance(axis, bool)):
            raise CalibrationError(f"{self.describe()}: axis must be None or an integer, got {axis!r}")
        self.axis = axis
        self._reset()

    def _reset(self) -> None:
        self.lo: Any = None
        self.hi: Any = None

    def _batch_range(self, x: np.ndarray) -> tuple[Any, Any]:
        if self.axis is None:
            lo, hi = x.min(), x.max()
            if not (np.isfinite(lo) and np.isfinite(hi)):
                finite = self._nonfinite(x)
                if not finite.any():
                    return None, None
                x = x[finite]
                lo, hi = x.min(), x.max()
            return float(lo), float(hi)
        axis = normalize_axis(self.axis, x.ndim)
        others = tuple(i for i in range(x.ndim) if i != axis)
        lo, hi = x.min(axis=others), x.max(axis=others)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            finite = self._nonfinite(x)
            lo = np.where(finite, x, np.inf).min(axis=others)
            hi = np.where(finite, x, -np.inf).max(axis=others)
            lo, hi = np.where(np.isinf(lo), np.nan, lo), np.where(np.isinf(hi), np.nan, hi)  # all-NaN channel
        lo, hi = lo.astype(np.float64), hi.astype(np.float64)
        if self.lo is not None and np.shape(self.lo) != lo.shape:
            raise CalibrationError(
                f"{self.describe()}: this batch has {lo.shape[0]} channels along axis {self.axis}, "
                f"earlier batches had {np.shape(self.lo)[0]}"
            )
        return lo, hi

    def _fold(self, lo: Any, hi: Any, combine: Callable[[Any, Any], tuple[Any, Any]]) -> None:
        """Fold a range into the state: the first one is taken as it is, later ones through ``combine``."""
        if lo is None:
            return
        if self.lo is None:
            self.lo, self.hi = lo, hi
            return
        lo, hi = combine(lo, hi)
        self.lo, self.hi = (float(lo), float(hi)) if self.axis is None else (lo, hi)

    def _update(self, x: np.ndarray) -> None:
        self._fold(*self._batch_range(x), self._step)

    def _merge(self, other: Calibrator) -> None:
        assert isinstance(other, _BatchRange)
        if self.lo is not None and other.lo is not None and np.shape(self.lo) != np.shape(other.lo):
            raise CalibrationError(
                f"cannot merge into {self.describe()}: ranges of shape {np.shape(other.lo)} "
                f"and {np.shape(self.lo)} (different channel counts)"
            )
        self._fold(other.lo, other.hi, lambda lo, hi: self._combine(lo, hi, other.num_batches))

    def _step(self, lo: Any, hi: Any) -> tuple[Any, Any]:
        """The state after one more batch whose range is (lo, hi)."""
        raise NotImplementedError

    def _combine(self, lo: Any, hi: Any, batches: int) -> tuple[Any, Any]:
        """The state after merging another calibrator's range (lo, hi), seen over ``batches`` batches."""
        return self._step(lo, hi)

    def _compute(self) -> Range:
        if self.lo is None or np.any(np.isnan(self.lo)):
            raise CalibrationError(f"{self.describe()}: no finite value has been seen (in some channel)")
        if self.axis is None:
            return Range(float(self.lo), float(self.hi))
        return Range(np.asarray(self.lo).copy(), np.asarray(self.hi).copy())

    def _state(self) -> dict[str, Any]:
        return {
            "lo": np.asarray(np.nan if self.lo is None else self.lo),
            "hi": np.asarray(np.nan if self.hi is None else self.hi),
        }

    def _load(self, state: dict[str, np.ndarray]) -> None:
        lo, hi = state["lo"], state["hi"]
        if self.axis is None:
            self.lo, self.hi = (None, None) if np.isnan(lo) else (float(lo), float(hi))
        else:
            self.lo, self.hi = lo.astype(np.float64), hi.astype(np.float64)


@register("minmax")
class MinMaxCalibrator(_BatchRange):
    """The smallest and largest value seen: ``lo = min(x)``, ``hi = max(x)`` over every batch.

    ``axis`` gives one range per slice along it (per-channel), e.g. ``axis=0`` for a Conv weight.

    >>> c = MinMaxCalibrator(axis=0)
    >>> c.update(np.array([[1.0, -2.0], [3.0, 4.0]]))
    >>> c.compute()
    Range(lo=array([-2.,  3.]), hi=array([1., 4.]))
    """

    def _step(self, lo: Any, hi: Any) -> tuple[Any, Any]:
        return np.fmin(self.lo, lo), np.fmax(self.hi, hi)


@register("ema")
class EMACalibrator(_BatchRange):
    """Exponential moving average of each batch's min and max:

        lo <- lo + momentum * (min(batch) - lo),   hi <- hi + momentum * (max(batch) - hi)

    starting from the first batch's range. Less sensitive than minmax to one rare outlier batch.
    ``merge`` averages two calibrators weighted by their batch counts (an EMA depends on batch order, so
    no merge can equal one sequential pass exactly).

    >>> c = EMACalibrator(momentum=0.5)
    >>> for hi in (2.0, 4.0):
    ...     c.update(np.array([0.0, hi]))
    >>> c.compute()
    Range(lo=0.0, hi=3.0)
    """

    def __init__(
        self,
        *,
        momentum: float = 0.1,
        axis: int | None = None,
        tensor: str | None = None,
        skip_nonfinite: bool = False,
    ):
        super().__init__(axis=axis, tensor=tensor, skip_nonfinite=skip_nonfinite)
        if not 0.0 < float(momentum) <= 1.0:
            raise CalibrationError(f"{self.describe()}: momentum must be in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)

    def _step(self, lo: Any, hi: Any) -> tuple[Any, Any]:
        # A channel with no finite value in this batch (NaN) keeps its average; one with no average yet
        # (NaN) starts from this batch.
        def ema(avg, batch):
            return np.where(np.isnan(batch), avg, np.where(np.isnan(avg), batch, avg + self.momentum * (batch - avg)))

        return ema(self.lo, lo), ema(self.hi, hi)

    def _combine(self, lo: Any, hi: Any, batches: int) -> tuple[Any, Any]:
        a, b = self.num_batches, batches
        return (np.asarray(self.lo) * a + lo * b) / (a + b), (np.asarray(self.hi) * a + hi * b) / (a + b)
