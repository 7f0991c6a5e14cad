"""grid_range: the range a calibrator chooses, made symmetric or cut to what it observed."""

from __future__ import annotations

import numpy as np

from lowbit.calib.grid import grid_range
from lowbit.calib.histogram_methods import MSECalibrator
from lowbit.calib.minmax import MinMaxCalibrator


def test_a_symmetric_grid_takes_the_larger_side():
    c = MinMaxCalibrator()
    c.update(np.array([-1.0, 2.5], np.float32))
    assert grid_range(c, symmetric=True) == (-2.5, 2.5)
    assert grid_range(c, symmetric=False) == (-1.0, 2.5)


def test_a_symmetric_method_on_a_post_relu_tensor_is_cut_to_what_it_saw():
    x = np.maximum(np.random.default_rng(0).standard_normal(10_000), 0).astype(np.float32)
    c = MSECalibrator()
    c.update(x)
    r = c.compute()
    assert float(r.lo) == -float(r.hi) < 0  # the method's own range is symmetric
    assert grid_range(c, symmetric=False) == (0.0, float(r.hi))
    assert grid_range(c, symmetric=True) == (float(r.lo), float(r.hi))
