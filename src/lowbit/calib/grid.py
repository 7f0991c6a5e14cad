"""The range a calibrator chooses, on the grid it is for: symmetric (-amax, amax), or cut to what it observed."""

from __future__ import annotations

import numpy as np

from lowbit.calib.histogram_methods import HistogramCalibrator


def grid_range(c, symmetric: bool) -> tuple[float, float]:
    """The range calibrator ``c`` chooses, for a symmetric grid (-amax, amax) or else cut to what it observed (a
    symmetric method's (-amax, amax) on a post-ReLU tensor becomes (0, amax))."""
    r = c.compute()
    lo, hi = float(np.min(r.lo)), float(np.max(r.hi))
    if symmetric:
        amax = max(abs(lo), abs(hi))
        return -amax, amax
    if isinstance(c, HistogramCalibrator):
        seen = c.observed
        lo, hi = max(lo, float(seen.lo)), min(hi, float(seen.hi))
    return lo, hi
