"""NumPy-only calibrators: ``update(x)`` / ``merge(other)`` / ``compute() -> Range`` / ``reset()``.

>>> import numpy as np
>>> from lowbit import calib
>>> c = calib.create("entropy", num_bins=2048, tensor="conv1")
>>> c.update(np.random.default_rng(0).standard_normal((8, 64, 14, 14)))
>>> lo, hi = c.compute()
>>> lo == -hi
True

Methods: ``minmax``, ``ema``, ``percentile``, ``entropy`` (TensorRT's KL method), ``mse``. Add one with
``@register("name")`` on a :class:`Calibrator` subclass.
"""

from lowbit.calib.base import Calibrator, Range, available, create, grid_options, option_names, register
from lowbit.calib.histogram import Histogram
from lowbit.calib.histogram_methods import (
    EntropyCalibrator,
    HistogramCalibrator,
    MSECalibrator,
    PercentileCalibrator,
)
from lowbit.calib.minmax import EMACalibrator, MinMaxCalibrator
from lowbit.calib.state import load, save

__all__ = [
    "Calibrator",
    "EMACalibrator",
    "EntropyCalibrator",
    "Histogram",
    "HistogramCalibrator",
    "MSECalibrator",
    "MinMaxCalibrator",
    "PercentileCalibrator",
    "Range",
    "available",
    "create",
    "grid_options",
    "load",
    "option_names",
    "register",
    "save",
]
