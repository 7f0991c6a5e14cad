"""ADMM calibration: the scale fitted to its own codes, never worse than its MinMax start, close to MSE's."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit import calib
from lowbit.calib import search
from lowbit.core import QuantSpec, fake_quant, qparams
from lowbit.errors import CalibrationError

SPECS = [QuantSpec(), QuantSpec(bits=4), QuantSpec(signed=False, symmetric=False),
         QuantSpec(bits=4, signed=False, symmetric=False)]  # fmt: skip


def _error(x: np.ndarray, lo: float, hi: float, spec: QuantSpec) -> float:
    scale, zero_point = qparams(lo, hi, spec)
    return float(((fake_quant(x.astype(np.float32), scale, zero_point, spec) - x) ** 2).mean())


def _data(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss+outliers":
        return np.concatenate([rng.standard_normal(50_000), rng.standard_normal(30) * 20])
    if kind == "relu":
        return np.maximum(rng.standard_normal(50_000) * 2 + 0.5, 0)
    return rng.laplace(size=50_000) * 0.1


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}bit-{'sym' if s.symmetric else 'asym'}")
@pytest.mark.parametrize("kind", ["gauss+outliers", "relu", "laplace"])
def test_admm_never_loses_to_its_minmax_start_and_comes_close_to_mse(spec, kind):
    x = _data(kind, 0)
    ranges = {}
    for method in ("minmax", "mse", "admm"):
        c = calib.create(method, **({} if method == "minmax" else {"spec": spec}))
        c.update(x)
        r = c.compute()
        amax = max(-r.lo, r.hi)
        ranges[method] = (-amax, amax) if spec.symmetric else (r.lo, r.hi)
    errors = {m: _error(x, *r, spec) for m, r in ranges.items()}
    # never worse on the histogram it fits; measured here on the raw values, bin rounding allows 0.1%
    assert errors["admm"] <= errors["minmax"] * 1.001
    assert errors["admm"] <= errors["mse"] * 1.5  # a fixed point, not a search: near the best, not at it


def test_the_fit_moves_the_scale_where_the_codes_want_it():
    edges = np.linspace(-8, 8, 1601)
    centres = (edges[1:] + edges[:-1]) / 2
    counts = np.exp(-(centres**2) / 2) * 1e5  # a Gaussian seen out to 8 sigma
    lo, hi = search.admm_range(counts, edges, QuantSpec(bits=4), lo=-8.0, hi=8.0)
    assert 1.5 < hi < 6.0 and lo == -hi  # clipped well inside the range, as the codes' least squares ask


def test_admm_merges_exactly_and_refuses_a_bad_option():
    x = _data("relu", 1)
    whole, a, b = (calib.create("admm", spec=QuantSpec(bits=4)) for _ in range(3))
    whole.update(x)
    a.update(x[:20_000])
    b.update(x[20_000:])
    a.merge(b)
    assert a.compute() == whole.compute()
    with pytest.raises(CalibrationError, match="max_rounds"):
        calib.create("admm", max_rounds=0)


def test_lowbit_quantize_takes_method_admm(tmp_path):
    from lowbit.cli import main
    from tests.onnx import models

    model = models.save(models.convnet(), tmp_path / "convnet.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 16, 16))
    assert main(["quantize", model, "--calib", data, "--method", "admm", "-o", str(tmp_path / "q.onnx"),
                 "--no-compare"]) == 0  # fmt: skip
    import json

    assert json.loads((tmp_path / "q.ranges.json").read_text())["method"] == "admm"


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=4, signed=False, symmetric=False)],
                         ids=["sym", "asym"])  # fmt: skip
def test_a_percentile_start_is_the_percentile_range_or_better(spec):
    x = _data("gauss+outliers", 2)
    starts = {}
    for method, options in (("percentile", {"percentile": 99.0, "symmetric": spec.symmetric}),
                            ("admm", {"spec": spec, "start": "percentile", "percentile": 99.0}),
                            ("admm", {"spec": spec})):  # fmt: skip
        c = calib.create(method, **options)
        c.update(x)
        starts[(method, options.get("start"))] = c.compute()
    percentile, from_percentile, from_max = starts.values()
    assert from_percentile != from_max  # the start matters: the fixed points differ
    assert _error(x, *from_percentile, spec) <= _error(x, *percentile, spec) * 1.001


def test_admm_names_its_bad_start_and_percentile():
    with pytest.raises(CalibrationError, match="start must be one of max, percentile, got 'median'"):
        calib.create("admm", start="median")
    with pytest.raises(CalibrationError, match="percentile must be a number in \\(0, 100\\], got 0"):
        calib.create("admm", start="percentile", percentile=0)
    c = calib.create("admm", start="percentile", percentile=99.9)
    assert c.options()["start"] == "percentile" and c.options()["percentile"] == 99.9
