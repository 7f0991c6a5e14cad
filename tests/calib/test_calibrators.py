import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import calib
from lowbit.calib import Range, create
from lowbit.core import QuantSpec, fake_quant, qparams
from lowbit.errors import CalibrationError

ALL_METHODS = ["minmax", "ema", "percentile", "entropy", "mse", "admm"]
EXACT_MERGE = ["minmax", "percentile", "entropy", "mse", "admm"]  # an EMA depends on batch order by definition


def _assert_range_equal(a: Range, b: Range) -> None:
    np.testing.assert_array_equal(np.asarray(a.lo), np.asarray(b.lo))
    np.testing.assert_array_equal(np.asarray(a.hi), np.asarray(b.hi))


def test_registry_lists_every_method():
    assert calib.available() == sorted(ALL_METHODS)
    for method in ALL_METHODS:
        assert create(method).method == method


def test_unknown_method_or_option_lists_the_known_ones():
    with pytest.raises(CalibrationError, match=r"unknown calibration method 'kl'; known methods: admm, ema, entropy"):
        create("kl")
    with pytest.raises(CalibrationError, match=r"no option 'bins'; its options are: num_bins, num_levels"):
        create("entropy", bins=2048)


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("percentile", {"percentile": 0}, r"percentile must be in \(0, 100\]"),
        ("percentile", {"percentile": 101}, r"percentile must be in \(0, 100\]"),
        ("ema", {"momentum": 0}, r"momentum must be in \(0, 1\]"),
        ("entropy", {"num_bins": 4}, r"num_bins must be an integer from 8"),
        ("entropy", {"num_levels": 4096}, r"num_levels must be an integer from 2 to num_bins"),
        ("mse", {"spec": QuantSpec(axis=0)}, r"needs a per-tensor spec"),
        ("mse", {"spec": {"bitz": 4}}, r"bad spec: unknown QuantSpec field"),
        ("minmax", {"axis": "0"}, r"axis must be None or an integer"),
    ],
)
def test_bad_options_are_clear_errors(method, options, match):
    with pytest.raises(CalibrationError, match=match):
        create(method, **options)


def test_minmax_per_tensor_and_per_channel():
    c = create("minmax")
    c.update(np.array([1.0, -2.0]))
    c.update(np.array([5.0, 0.0]))
    assert c.compute() == (-2.0, 5.0)
    pc = create("minmax", axis=1)
    pc.update(np.array([[1.0, -2.0, 0.0], [3.0, 4.0, 0.5]]))
    pc.update(np.array([[-1.0, 9.0, 0.2]]))
    _assert_range_equal(pc.compute(), Range(np.array([-1.0, -2.0, 0.0]), np.array([3.0, 9.0, 0.5])))


def test_ema_follows_its_formula_per_channel():
    c = create("ema", momentum=0.25, axis=0)
    batches = [np.array([[0.0, 2.0], [-1.0, 1.0]]), np.array([[0.0, 6.0], [-5.0, 1.0]])]
    for b in batches:
        c.update(b)
    lo = np.array([0.0, -1.0]) + 0.25 * (np.array([0.0, -5.0]) - np.array([0.0, -1.0]))
    hi = np.array([2.0, 1.0]) + 0.25 * (np.array([6.0, 1.0]) - np.array([2.0, 1.0]))
    _assert_range_equal(c.compute(), Range(lo, hi))


def test_percentile_symmetric_and_two_sided():
    x = np.arange(-1000, 1001, dtype=np.float32)
    sym = create("percentile", percentile=99.0)
    sym.update(x)
    lo, hi = sym.compute()
    assert lo == -hi and hi == pytest.approx(990, abs=2)
    two = create("percentile", percentile=98.0, symmetric=False)
    two.update(np.r_[x, np.full(10, 5000.0)])
    lo, hi = two.compute()
    assert lo == pytest.approx(-980, abs=3) and hi == pytest.approx(990, abs=3)
    full = create("percentile", percentile=100.0)
    full.update(x)
    assert full.compute().hi == 1000.0


def test_mse_beats_minmax_on_heavy_tails_and_fits_one_sided_data():
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, 100_000).astype(np.float32)
    spec = QuantSpec(bits=4)
    results = {}
    for method, options in {"minmax": {}, "mse": {"spec": spec}}.items():
        c = create(method, **options)
        c.update(x)
        scale, zp = qparams(*c.compute(), spec)
        results[method] = float(np.mean((fake_quant(x, scale, zp, spec) - x) ** 2))
    assert results["mse"] < 0.5 * results["minmax"]
    relu = create("mse", spec=QuantSpec(signed=False, symmetric=False))
    relu.update(np.maximum(x, 0))
    lo, hi = relu.compute()
    assert lo == 0.0 and 0 < hi < x.max()


def _batches(draw_lists):
    return [np.array(b, np.float32) for b in draw_lists]


batch_lists = st.lists(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=30), min_size=2, max_size=5
)


@pytest.mark.parametrize("method", EXACT_MERGE)
@settings(max_examples=40, deadline=None)
@given(lists=batch_lists, split=st.integers(1, 4))
def test_merge_equals_update_on_the_concatenation(method, lists, split):
    batches = _batches(lists)
    whole = create(method)
    whole.update(np.concatenate(batches))
    a, b = create(method), create(method)
    for x in batches[:split]:
        a.update(x)
    for x in batches[split:]:
        b.update(x)
    a.merge(b)
    _assert_range_equal(a.compute(), whole.compute())


def test_per_channel_minmax_merge_equals_concatenation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4, 3))
    whole = create("minmax", axis=1)
    whole.update(x)
    a, b = create("minmax", axis=1), create("minmax", axis=1)
    a.update(x[:3])
    b.update(x[3:])
    a.merge(b)
    _assert_range_equal(a.compute(), whole.compute())


def test_ema_merge_weights_by_batch_count():
    a, b = create("ema"), create("ema")
    a.update(np.array([0.0, 1.0]))
    for _ in range(3):
        b.update(np.array([0.0, 5.0]))
    a.merge(b)
    assert a.compute().hi == pytest.approx((1.0 * 1 + 5.0 * 3) / 4)
    assert a.num_batches == 4


@pytest.mark.parametrize("method", ALL_METHODS)
def test_state_round_trips_through_a_file_and_merges_across_processes(method, tmp_path):
    rng = np.random.default_rng(1)
    data = [rng.laplace(size=(4, 100)).astype(np.float32) for _ in range(4)]
    worker_a, worker_b = create(method, tensor="act"), create(method, tensor="act")
    for x in data[:2]:
        worker_a.update(x)
    for x in data[2:]:
        worker_b.update(x)
    calib.save(tmp_path / "a.npz", {"act": worker_a})
    calib.save(tmp_path / "b.npz", {"act": worker_b})
    merged = calib.load(tmp_path / "a.npz")["act"]
    merged.merge(calib.load(tmp_path / "b.npz")["act"])
    local = create(method)
    for x in data[:2]:
        local.update(x)
    local.merge(worker_b)
    _assert_range_equal(merged.compute(), local.compute())
    assert merged.num_batches == 4
    if method in EXACT_MERGE:
        sequential = create(method)
        for x in data:
            sequential.update(x)
        _assert_range_equal(merged.compute(), sequential.compute())


def test_reset_forgets_the_statistics():
    c = create("entropy")
    c.update(np.ones(10))
    c.reset()
    with pytest.raises(CalibrationError, match="before any update"):
        c.compute()
    c.update(np.array([0.5, -0.25]))
    assert c.compute().hi <= 0.5


@pytest.mark.parametrize("method", ALL_METHODS)
def test_compute_before_update_is_a_clear_error(method):
    with pytest.raises(CalibrationError, match=rf"{method} calibrator for tensor 'x': compute\(\) was called before"):
        create(method, tensor="x").compute()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_nan_or_inf_names_the_calibrator_and_tensor(method):
    c = create(method, tensor="conv1_out")
    with pytest.raises(
        CalibrationError, match=r"for tensor 'conv1_out': batch 0 \(counting from 0\) contains 1 NaN and 2 Inf values"
    ):
        c.update(np.array([1.0, np.nan, np.inf, -np.inf]))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_nonfinite_message_counts_batches_from_0_and_spells_the_fix_for_both_front_ends(method):
    c = create(method, tensor="relu3")
    c.update(np.array([1.0, 2.0]))
    with pytest.raises(CalibrationError) as info:
        c.update(np.array([[np.inf, 1.0], [-np.inf, np.inf]]))
    message = str(info.value)
    assert "batch 1 (counting from 0) contains 0 NaN and 3 Inf values" in message
    assert "skip_nonfinite=True" in message and "--option skip_nonfinite=true" in message
    assert "--skip-nonfinite" in message and "\n" not in message


@pytest.mark.parametrize("method", ALL_METHODS)
def test_skip_nonfinite_ignores_such_values(method):
    c = create(method, skip_nonfinite=True)
    c.update(np.array([1.0, np.nan, np.inf, -2.0, 0.5]))
    clean = create(method)
    clean.update(np.array([1.0, -2.0, 0.5]))
    _assert_range_equal(c.compute(), clean.compute())


def test_all_nonfinite_then_compute_is_a_clear_error():
    for method in ("minmax", "entropy"):
        c = create(method, skip_nonfinite=True)
        c.update(np.array([np.nan]))
        with pytest.raises(CalibrationError, match=r"NaN or Inf|no finite value"):
            c.compute()


def test_per_channel_nan_is_skipped_per_channel():
    c = create("minmax", axis=0, skip_nonfinite=True)
    c.update(np.array([[1.0, np.nan], [np.inf, -3.0]]))
    _assert_range_equal(c.compute(), Range(np.array([1.0, -3.0]), np.array([1.0, -3.0])))


def test_ema_channel_that_starts_all_nan_recovers():
    c = create("ema", axis=0, momentum=0.5, skip_nonfinite=True)
    c.update(np.array([[1.0, 3.0], [np.nan, np.nan]]))
    c.update(np.array([[1.0, 5.0], [2.0, 4.0]]))
    c.update(np.array([[1.0, 5.0], [np.nan, np.nan]]))
    # channel 0: hi 3 -> 3 + 0.5 * (5 - 3) = 4 -> 4.5; channel 1 starts at (2, 4) and keeps it over the NaN batch
    _assert_range_equal(c.compute(), Range(np.array([1.0, 2.0]), np.array([4.5, 4.0])))


def test_channel_count_mismatch_is_a_clear_error():
    c = create("minmax", axis=1, tensor="w")
    c.update(np.zeros((2, 64)))
    with pytest.raises(CalibrationError, match="this batch has 32 channels along axis 1, earlier batches had 64"):
        c.update(np.zeros((2, 32)))
    other = create("minmax", axis=1)
    other.update(np.zeros((2, 32)))
    with pytest.raises(CalibrationError, match="different channel counts"):
        c.merge(other)
    with pytest.raises(CalibrationError, match="axis 1 is out of range for a tensor of rank 1"):
        c.update(np.zeros(3))


def test_merging_different_methods_or_options_is_a_clear_error():
    with pytest.raises(CalibrationError, match="cannot merge a minmax calibrator into entropy calibrator"):
        create("entropy").merge(create("minmax"))
    with pytest.raises(CalibrationError, match="options differ"):
        create("percentile", percentile=99.9).merge(create("percentile", percentile=99.0))
    a = create("entropy", tensor="a")
    a.merge(create("entropy", tensor="b"))  # names do not change the statistics


def test_loading_another_calibrators_state_is_a_clear_error(tmp_path):
    c = create("minmax")
    c.update(np.ones(3))
    with pytest.raises(CalibrationError, match="cannot load the state of a 'minmax' calibrator"):
        create("entropy").load_state_dict(c.state_dict())
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="is not a lowbit calibrator file"):
        calib.load(bad)


def test_non_numeric_and_empty_batches():
    c = create("minmax")
    with pytest.raises(CalibrationError, match="expected a numeric array"):
        c.update(np.array(["a"]))
    c.update(np.zeros((0, 3)))
    assert c.num_batches == 0
