"""The error meters: what each calibrator's range costs, read from a histogram, against really quantizing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowbit.analysis import expected_sqnr_db, tensor_report
from lowbit.calib.histogram_methods import MSECalibrator
from lowbit.core import QuantSpec, fake_quant, qparams


def test_histogram_thresholds_and_their_sqnr():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0]]).astype(np.float32)  # two outliers
    cal = MSECalibrator(tensor="t")
    cal.update(x)
    rep = tensor_report("t", cal, QuantSpec(), "mse")
    assert set(rep.ranges) == {"minmax", "percentile", "entropy", "mse"}
    assert rep.ranges["minmax"]["hi"] == pytest.approx(40.0)
    assert rep.ranges["mse"]["hi"] < 30  # the outliers are clipped
    assert rep.ranges["mse"]["sqnr_db"] > rep.ranges["minmax"]["sqnr_db"]
    assert rep.ranges["mse"]["sqnr_db"] >= max(r["sqnr_db"] for r in rep.ranges.values()) - 0.3
    assert sum(rep.counts) == x.size and len(rep.edges) == len(rep.counts) + 1
    # the SQNR read from the histogram is the SQNR of really quantizing the values
    spec = QuantSpec()
    lo, hi = rep.ranges["mse"]["lo"], rep.ranges["mse"]["hi"]
    scale, zp = qparams(lo, hi, spec)
    err = x.astype(np.float64) - fake_quant(x, scale, zp, spec)
    true_sqnr = 10 * math.log10((x.astype(np.float64) ** 2).sum() / (err**2).sum())
    assert expected_sqnr_db(cal.histogram, lo, hi, spec) == pytest.approx(true_sqnr, abs=0.5)
