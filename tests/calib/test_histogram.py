import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.calib import Histogram


def _same(a: Histogram, b: Histogram) -> None:
    np.testing.assert_array_equal(a.counts, b.counts)
    assert (a.exponent, a.lo, a.hi, a.total) == (b.exponent, b.lo, b.hi, b.total)


values = st.floats(-1e6, 1e6, allow_nan=False, width=32)
batches = st.lists(st.lists(values, min_size=0, max_size=40), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(batches=batches, split=st.integers(0, 6), num_bins=st.sampled_from([8, 64, 2048]))
def test_any_split_and_merge_equals_one_histogram_of_all_the_data(batches, split, num_bins):
    arrays = [np.array(b, np.float32) for b in batches]
    whole = Histogram(num_bins)
    whole.update(np.concatenate(arrays))
    sequential = Histogram(num_bins)
    for a in arrays:
        sequential.update(a)
    _same(sequential, whole)
    left, right = Histogram(num_bins), Histogram(num_bins)
    for a in arrays[:split]:
        left.update(a)
    for a in arrays[split:]:
        right.update(a)
    left.merge(right)
    _same(left, whole)


def test_bins_count_magnitudes_on_a_power_of_two_grid():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(50_000) * 3).astype(np.float32)
    x[:100] = np.round(x[:100])  # exact multiples of the width land in the bin they start
    h = Histogram(2048)
    h.update(x)
    w = h.width
    assert math.frexp(w)[0] == 0.5
    amax = float(np.abs(x).max())
    assert 2048 <= amax / w < 4096
    expected = np.bincount(np.floor(np.abs(x.astype(np.float64)) / w).astype(int), minlength=4096)
    folded = h.counts[0] + h.counts[1]
    np.testing.assert_array_equal(folded, expected[:4096])
    assert h.counts[0].sum() == (x < 0).sum()
    np.testing.assert_array_equal(h.magnitude(), np.trim_zeros(folded, "b"))


def test_widening_by_a_large_factor_is_exact():
    small = np.linspace(-1e-3, 1e-3, 1001, dtype=np.float32)
    big = np.array([1e5, -3e4], np.float32)
    h = Histogram(64)
    h.update(small)
    h.update(big)
    whole = Histogram(64)
    whole.update(np.concatenate([small, big]))
    _same(h, whole)


def test_zeros_then_data_and_extreme_magnitudes():
    h = Histogram(16)
    h.update(np.zeros(5, np.float32))
    assert h.exponent is None and h.counts[1, 0] == 5 and h.amax == 0
    h.update(np.array([-0.0, 1e-40, -3e38], np.float32))
    whole = Histogram(16)
    whole.update(np.array([0, 0, 0, 0, 0, -0.0, 1e-40, -3e38], np.float32))
    _same(h, whole)
    assert h.total == 8 and h.amax == np.float32(3e38)


def test_signed_view_edges_and_counts():
    h = Histogram(8)
    h.update(np.array([-1.0, -0.1, 0.0, 0.5, 1.9], np.float32))
    counts, edges = h.signed()
    assert len(edges) == len(counts) + 1 and edges[0] == -edges[-1]
    centres = (edges[:-1] + edges[1:]) / 2
    assert counts.sum() == 5
    assert counts[centres < 0].sum() == 2


def test_float16_and_integer_input():
    h = Histogram(32)
    h.update(np.array([1, -2, 3], np.int32))
    h.update(np.array([0.5, -0.25], np.float16))
    assert h.total == 5 and (h.lo, h.hi) == (-2.0, 3.0)


def test_state_round_trip():
    h = Histogram(32)
    h.update(np.random.default_rng(1).standard_normal(1000))
    h2 = Histogram(32)
    h2.load_state_dict(h.state_dict())
    _same(h, h2)
