"""ADMM per slice (lowbit.core.admm_range_per_slice) against a plain loop over the slices, never worse than its
start, and the weight ranges by method (lowbit.core.weight_range)."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.core import (
    QuantSpec,
    admm_range_per_slice,
    fake_quant,
    percentile_range_per_slice,
    qparams,
    quantize,
    weight_range,
)
from lowbit.errors import SpecError

SPECS = [QuantSpec(bits=4, axis=0), QuantSpec(bits=4, axis=0, signed=False, symmetric=False),
         QuantSpec(axis=0), QuantSpec(bits=3, axis=0, signed=False, symmetric=False)]  # fmt: skip


def _loop_admm(x: np.ndarray, spec: QuantSpec, lo: float, hi: float, max_rounds: int = 50) -> tuple[float, float]:
    """One slice, written out: quantize, keep the best range, stop on unchanged codes, fit the scale."""
    x = x.astype(np.float64)
    grid = spec.replace(axis=None, group_size=None)
    best, best_error, previous = (lo, hi), np.inf, None
    for _ in range(max_rounds):
        scale, zp = qparams(lo, hi, grid)
        q = quantize(x, scale, zp, grid).astype(np.float64)
        s, z = float(scale), float(zp)
        error = sum(((qi - z) * s - xi) ** 2 for qi, xi in zip(q, x, strict=True))
        if error < best_error:
            best, best_error = (lo, hi), error
        if previous is not None and (q == previous).all():
            break
        previous = q
        if spec.symmetric:
            d = q - z
            s = float(x @ d / (d @ d)) if d @ d > 0 else 0.0
            if s <= 0:
                break
            half = 2 ** (spec.bits - 1) - 1
            lo, hi = -s * half, s * half
        else:
            a, c = np.polyfit(q, x, 1) if q.std() > 0 else (0.0, 0.0)
            if a <= 0:
                break
            lo, hi = a * spec.qmin + c, a * spec.qmax + c
    return best


def _slice_errors(w: np.ndarray, lo, hi, spec: QuantSpec) -> np.ndarray:
    scale, zp = qparams(lo, hi, spec)
    d = fake_quant(w, scale, zp, spec).astype(np.float64) - w
    return (d * d).reshape(w.shape[0], -1).sum(axis=1)


def _channels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.standard_normal(512), rng.uniform(-1, 1, 512), rng.laplace(size=512) * 0.01,
                     np.r_[rng.standard_normal(508) * 0.1, 3.0, -2.0, 2.5, 1.0],
                     np.maximum(rng.standard_normal(512), 0), np.zeros(512)]).astype(np.float32)  # fmt: skip


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}bit-{'sym' if s.symmetric else 'asym'}")
def test_per_slice_admm_is_the_plain_loop_on_each_channel(spec):
    w = _channels()
    lo, hi = admm_range_per_slice(w, spec)
    for c in range(w.shape[0]):
        a, b = float(w[c].min()), float(w[c].max())
        if spec.symmetric:
            a, b = -max(-a, b), max(-a, b)
        want = _loop_admm(w[c], spec, a, b)
        np.testing.assert_allclose((lo[c], hi[c]), want, rtol=1e-9, atol=1e-12, err_msg=f"channel {c}")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}bit-{'sym' if s.symmetric else 'asym'}")
def test_admm_is_never_worse_than_its_max_start_on_any_slice(spec):
    w = _channels(1)
    start = (w.min(axis=1), w.max(axis=1))
    if spec.symmetric:
        amax = np.abs(w).max(axis=1)
        start = (-amax, amax)
    assert (_slice_errors(w, *admm_range_per_slice(w, spec), spec) <= _slice_errors(w, *start, spec) * (1 + 1e-6)).all()


def test_4bit_gaussian_channels_are_clipped_uniform_ones_kept():
    rng = np.random.default_rng(2)
    w = np.concatenate([rng.standard_normal((4, 2048)), rng.uniform(-1, 1, (4, 2048))]).astype(np.float32)
    _, hi = admm_range_per_slice(w, QuantSpec(bits=4, axis=0))
    amax = np.abs(w).max(axis=1)
    assert (hi[:4] < 0.85 * amax[:4]).all() and (hi[4:] > 0.9 * amax[4:]).all()


def test_asymmetric_ranges_follow_one_sided_channels():
    rng = np.random.default_rng(3)
    w = np.stack([np.maximum(rng.standard_normal(1024), 0), rng.standard_normal(1024) + 3]).astype(np.float32)
    spec = QuantSpec(bits=4, axis=0, signed=False, symmetric=False)
    lo, hi = admm_range_per_slice(w, spec)
    assert (lo <= 0.05).all() and (hi < w.max(axis=1)).all()
    assert (_slice_errors(w, lo, hi, spec) < _slice_errors(w, w.min(axis=1), w.max(axis=1), spec)).all()


def test_groups_and_the_whole_tensor_are_slices_too():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 40)).astype(np.float32)  # groups of 16 along axis 1: 16, 16, 8
    spec = QuantSpec(bits=4, axis=1, group_size=16)
    lo, hi = admm_range_per_slice(w, spec)
    assert lo.shape == (3, 3)
    for r in range(3):
        for g, part in enumerate((w[r, :16], w[r, 16:32], w[r, 32:])):
            amax = float(np.abs(part).max())
            np.testing.assert_allclose(hi[r, g], _loop_admm(part, spec, -amax, amax)[1], rtol=1e-9)
    lo, hi = admm_range_per_slice(w, QuantSpec(bits=4))
    amax = float(np.abs(w).max())
    assert lo.shape == () and np.isclose(hi, _loop_admm(w.ravel(), QuantSpec(bits=4), -amax, amax)[1])


def test_weights_count_values_as_repeats():
    x = np.array([-1.0, -0.3, 0.1, 0.2, 0.9, 2.0])
    counts = np.array([3, 1, 5, 2, 4, 1])
    spec = QuantSpec(bits=3)
    repeated = admm_range_per_slice(np.repeat(x, counts), spec)
    np.testing.assert_allclose(admm_range_per_slice(x, spec, weights=counts), repeated)


def test_a_percentile_start_is_never_beaten_by_its_own_start():
    w = _channels(5)[:5]
    spec = QuantSpec(bits=4, axis=0)
    start = percentile_range_per_slice(w, spec, 99.0)
    np.testing.assert_allclose(start[1], np.percentile(np.abs(w), 99.0, axis=1))
    lo, hi = weight_range(w, spec, "admm", {"start": "percentile", "percentile": 99.0})
    assert (_slice_errors(w, lo, hi, spec) <= _slice_errors(w, *start, spec) * (1 + 1e-6)).all()
    assert not np.allclose(hi, admm_range_per_slice(w, spec)[1])  # another start, another fixed point somewhere


def test_weight_range_by_method_and_its_messages():
    w = _channels(6)[:5]
    spec = QuantSpec(bits=4, axis=0)
    np.testing.assert_array_equal(weight_range(w, spec)[1], w.max(axis=1))
    assert (weight_range(w, spec, "mse")[1] <= np.abs(w).max(axis=1)).all()
    with pytest.raises(SpecError, match="unknown weight method 'kl'; weight methods: minmax, mse, admm"):
        weight_range(w, spec, "kl")
    with pytest.raises(SpecError, match="weight method 'admm' has no option 'rounds'"):
        weight_range(w, spec, "admm", {"rounds": 3})
    with pytest.raises(SpecError, match="start must be one of max, percentile"):
        weight_range(w, spec, "admm", {"start": "min"})
    with pytest.raises(SpecError, match="percentile must be a number in \\(0, 100\\]"):
        weight_range(w, spec, "admm", {"start": "percentile", "percentile": 101})
