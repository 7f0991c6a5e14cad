"""lowbit.core.gptq: the second moment both front ends gather, and the column-by-column rounding."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.core.gptq import SecondMoment, round_matrix


def _rows(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 5, n)).astype(np.float32)  # (groups, columns, rows)


def test_the_moment_of_batches_is_the_moment_of_all_rows_at_once():
    a, b = _rows(0, 7), _rows(1, 13)
    m = SecondMoment()
    m.add(a)
    m.add(b)
    whole = np.concatenate([a, b], axis=2).astype(np.float64)
    np.testing.assert_allclose(m.value, whole @ whole.transpose(0, 2, 1) / 20, rtol=1e-5)
    assert m.count == 20 and m.sum.dtype == np.float64
    other = SecondMoment()
    other.add_product(a @ a.transpose(0, 2, 1), 7)  # a product computed elsewhere folds in the same way
    other.add(b)
    np.testing.assert_array_equal(other.value, m.value)


def test_torch_tensors_accumulate_in_float64_on_their_device():
    torch = pytest.importorskip("torch")
    a = _rows(2, 9)
    m, t = SecondMoment(), SecondMoment()
    m.add(a)
    t.add(torch.from_numpy(a))
    assert t.sum.dtype == torch.float64
    np.testing.assert_allclose(t.value.numpy(), m.value, rtol=1e-6)


def test_merging_the_moments_of_two_halves_gives_the_moment_of_the_whole():
    a, b = _rows(4, 11).astype(np.float64), _rows(5, 6).astype(np.float64)  # no float32 rounding to compare
    whole, first, second = SecondMoment(), SecondMoment(), SecondMoment()
    whole.add(np.concatenate([a, b], axis=2))
    first.add(a)
    second.add(b)
    first.merge(second)
    assert first.count == whole.count == 17
    np.testing.assert_allclose(first.value, whole.value, rtol=1e-12, atol=1e-15)
    empty = SecondMoment()
    empty.merge(SecondMoment())  # nothing seen on either side: still nothing
    assert empty.sum is None and empty.count == 0
    empty.merge(whole)
    np.testing.assert_array_equal(empty.value, whole.value)


def test_an_empty_moment_has_no_value():
    with pytest.raises(ValueError, match="no data seen"):
        _ = SecondMoment().value


def test_gptq_codes_beat_nearest_rounding_on_the_data_they_were_fitted_to():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 16, 400)) * np.linspace(0.2, 3.0, 16)[None, :, None]  # uneven input scales
    x[:, 8:] = x[:, :8] + 0.1 * x[:, 8:]  # correlated inputs: errors can cancel
    w = rng.standard_normal((1, 6, 16))
    scale = np.abs(w).max(axis=2, keepdims=True) / 7  # 4-bit, per row
    m = SecondMoment()
    m.add(x)
    codes = round_matrix(w, scale, 0.0, -8, 7, m.value)
    nearest = np.clip(np.rint(w / scale), -8, 7)
    err = [float(np.sum(((q * scale - w) @ x) ** 2)) for q in (codes, nearest)]
    assert err[0] < 0.92 * err[1]  # 0.89 with this seed
    assert codes.min() >= -8 and codes.max() <= 7


def test_uncorrelated_inputs_leave_nearest_rounding_and_correlated_ones_lower_the_output_error():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(1, 6, 20))
    scale = np.abs(w).max(axis=2, keepdims=True) / 7
    nearest = np.clip(np.rint(w / scale), -8, 7)
    q = round_matrix(w, scale, 0.0, -8, 7, np.eye(20)[None])
    np.testing.assert_array_equal(q, nearest)  # H = I: no error to cancel, every weight keeps its nearest code
    x = rng.normal(size=(5000, 20)) @ rng.normal(size=(20, 20))  # correlated inputs
    h = (x.T @ x / len(x))[None]
    q = round_matrix(w, scale, 0.0, -8, 7, h)
    assert q.min() >= -8 and q.max() <= 7 and np.all(q == np.rint(q))

    def output_error(codes):
        return float(np.mean((x @ (w[0] - codes[0] * scale[0]).T) ** 2))

    assert output_error(q) < 0.7 * output_error(nearest)


def _correlated(seed: int, columns: int, n: int = 3000, uneven: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, columns)) @ rng.normal(size=(columns, columns))
    if uneven:  # energy growing along the columns: the natural order rounds the least important first
        x *= np.geomspace(0.1, 10, columns)
    return x, (x.T @ x / n)[None]


def test_act_order_rounds_in_order_of_energy_and_returns_codes_in_the_original_order():
    x, h = _correlated(1, 24)
    w = np.random.default_rng(2).normal(size=(1, 5, 24))
    scale = np.abs(w).max(axis=2, keepdims=True) / 7
    plain = round_matrix(w, scale, 0.0, -8, 7, h)
    ordered = round_matrix(w, scale, 0.0, -8, 7, h, act_order=True)
    # The same rounding on permuted columns, undone by hand: the reference for the permutation bookkeeping.
    order = np.argsort(-np.diag(h[0]), kind="stable")
    by_hand = np.empty_like(plain)
    by_hand[:, :, order] = round_matrix(w[:, :, order], scale, 0.0, -8, 7, h[:, order][:, :, order])
    np.testing.assert_array_equal(ordered, by_hand)
    assert not np.array_equal(ordered, plain)

    def output_error(codes):
        return float(np.mean((x @ (w[0] - codes[0] * scale[0]).T) ** 2))

    nearest = np.clip(np.rint(w / scale), -8, 7)
    assert output_error(ordered) < 0.7 * min(output_error(nearest), output_error(plain))  # 0.45 with this seed


def test_groups_fitted_as_gptq_goes_give_codes_on_their_own_grid_and_beat_nearest():
    from lowbit.core.gptq import round_groups

    x, h = _correlated(3, 32, uneven=False)
    w = np.random.default_rng(4).normal(size=(1, 4, 32))

    def fit(block):  # symmetric 4-bit per row of the group, as plain rounding would fit it
        s = np.abs(block).max(axis=2, keepdims=True) / 7
        return s, np.zeros_like(s)

    codes, scale, zero = round_groups(w, 8, fit, -8, 7, h)
    assert codes.shape == w.shape and scale.shape == (1, 4, 4) and np.all(zero == 0)
    assert codes.min() >= -8 and codes.max() <= 7 and np.all(codes == np.rint(codes))
    # The first group is fitted on the weights before any update: its scale is plain rounding's.
    np.testing.assert_allclose(scale[:, :, 0], np.abs(w[:, :, :8]).max(axis=2) / 7)
    deq = codes * np.repeat(scale, 8, axis=2)
    s0 = np.repeat(np.abs(w).reshape(1, 4, 4, 8).max(axis=3) / 7, 8, axis=2)
    nearest = np.clip(np.rint(w / s0), -8, 7) * s0
    err = [float(np.mean((x @ (w[0] - d[0]).T) ** 2)) for d in (deq, nearest)]
    assert err[0] < 0.8 * err[1]  # 0.56 with this seed
    with pytest.raises(ValueError, match="groups of 5"):
        round_groups(w, 5, fit, -8, 7, h)
