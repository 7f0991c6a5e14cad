"""lowbit.calib.run: several methods over named tensor streams in one pass, side by side."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.calib import available
from lowbit.calib.run import compare_methods, method_list
from lowbit.core import QuantSpec
from lowbit.errors import CalibrationError


def _sources():
    rng = np.random.default_rng(0)
    heavy = [rng.standard_t(2, 4096).astype(np.float32) for _ in range(3)]  # outliers: clipping pays
    flat = [rng.uniform(-1, 1, 4096).astype(np.float32) for _ in range(3)]  # none: minmax is best
    return {"heavy": heavy, "flat": flat}


def test_all_puts_entropy_first_and_a_list_keeps_its_order():
    assert method_list("all")[0] == "entropy" and sorted(method_list("all")) == sorted(available())
    assert method_list("mse, minmax") == ["mse", "minmax"]
    with pytest.raises(CalibrationError, match=r"unknown method 'kl'; known methods: .* \(or 'all'\)"):
        method_list("minmax,kl")


def test_compare_methods_measures_every_range_and_picks_the_best_per_tensor():
    comparison = compare_methods(_sources(), ["minmax", "mse"], QuantSpec(), progress=False)
    assert len(comparison.results) == 4
    best = comparison.best()
    by = {(r.tensor, r.method): r for r in comparison.results}
    for tensor in ("heavy", "flat"):
        assert best[tensor].sqnr_db == max(by[(tensor, m)].sqnr_db for m in ("minmax", "mse"))
    assert best["heavy"].method == "mse"  # a clipped range beats the outliers' full range
    assert comparison.amax() == {t: by[(t, "minmax")].amax for t in ("heavy", "flat")}  # the first method's
    assert set(comparison.primary()) == {"heavy", "flat"}
    assert comparison.primary()["flat"].method == "minmax"
    data = comparison.to_dict()
    assert data["spec"]["bits"] == 8 and len(data["results"]) == 4
