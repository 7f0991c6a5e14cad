"""lowbit.core.smoothing: SmoothQuant's and AWQ's per-input-channel scales, and the statistics they read."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.core.smoothing import ChannelStats, output_error, search_alpha, search_scales, smooth_scales


def _int4_groups(w: np.ndarray, group: int = 8) -> np.ndarray:
    """Symmetric 4-bit per row and group of ``group`` columns, nearest: a plain-loop reference quantizer."""
    out = np.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], group):
            g = w[r, c : c + group]
            s = max(np.abs(g).max() / 7, 1e-12)
            out[r, c : c + group] = np.clip(np.rint(g / s), -8, 7) * s
    return out


def _int8_tensor(x: np.ndarray) -> np.ndarray:
    s = max(np.abs(x).max() / 127, 1e-12)
    return np.clip(np.rint(x / s), -127, 127) * s


def _outlier_inputs(seed: int, n: int = 512, columns: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, columns))
    x[:, [3, 17]] *= 40.0  # a few outlier channels, as in transformers' activations
    return x


def test_channel_stats_merge_like_one_pass_over_all_rows():
    rows = np.random.default_rng(0).normal(size=(100, 6))
    whole, a, b = ChannelStats(), ChannelStats(), ChannelStats()
    whole.update(rows)
    a.update(rows[:37])
    b.update(rows[37:])
    a.merge(b)
    np.testing.assert_allclose(a.mean_abs, np.abs(rows).mean(axis=0))
    np.testing.assert_allclose(a.amax, whole.amax)
    assert a.count == 100
    with pytest.raises(ValueError, match="columns"):
        a.update(rows[:, :3])
    with pytest.raises(ValueError, match="no data"):
        _ = ChannelStats().mean_abs


def test_smooth_scales_follow_the_formula_and_leave_dead_columns_alone():
    act, w = np.array([16.0, 1.0, 0.0, 4.0]), np.array([1.0, 4.0, 2.0, 0.0])
    s = smooth_scales(act, w, alpha=0.5)
    np.testing.assert_allclose(s[:2], [16**0.5 / 1**0.5, 1 / 4**0.5])
    np.testing.assert_array_equal(s[2:], [1.0, 1.0])
    np.testing.assert_allclose(smooth_scales(act[:2], w[:2], alpha=1.0), act[:2])
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(act, w, alpha=1.5)


def test_scaling_inputs_down_and_weights_up_keeps_the_float_product():
    x = _outlier_inputs(1)
    w = np.random.default_rng(2).normal(size=(6, 32))
    s = smooth_scales(np.abs(x).max(axis=0), np.abs(w).max(axis=0))
    np.testing.assert_allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-6, atol=1e-9)
    assert output_error([w], x, s, lambda v: v) < 1e-9 * float(np.mean((x @ w.T) ** 2))


def test_awq_protects_the_weights_of_large_inputs_and_is_never_worse_than_plain_rounding():
    x = _outlier_inputs(3)
    rng = np.random.default_rng(4)
    w = [rng.normal(size=(8, 32)), rng.normal(size=(5, 32))]  # two matrices reading one input (q and k)
    found = search_scales(w, x, _int4_groups)
    assert found.plain_error == pytest.approx(output_error(w, x, np.ones(32), _int4_groups))
    assert found.error <= found.plain_error
    assert found.exponent > 0 and found.error < 0.8 * found.plain_error
    assert found.scales[3] > np.median(found.scales) and found.scales[17] > np.median(found.scales)
    # On inputs without outliers the search has little to gain, and never loses.
    flat = np.random.default_rng(5).normal(size=(512, 32))
    assert search_scales(w, flat, _int4_groups).error <= output_error(w, flat, np.ones(32), _int4_groups)


def test_smoothquant_alpha_search_lowers_the_w8a8_error_of_outlier_inputs():
    x = _outlier_inputs(6)
    w = [np.random.default_rng(7).normal(size=(16, 32))]
    found = search_alpha(w, x, _int8_tensor, _int8_tensor)
    assert 0.0 <= found.exponent <= 1.0
    assert found.error < 0.5 * found.plain_error
    assert found.error == pytest.approx(output_error(w, x, found.scales, _int8_tensor, _int8_tensor))
