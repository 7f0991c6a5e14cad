import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lowbit.core import (
    QuantSpec,
    binarize,
    binary_scale,
    dequantize,
    fake_quant,
    qparams,
    qparams_from_tensor,
    quantize,
)
from lowbit.errors import SpecError

specs = st.builds(
    QuantSpec,
    bits=st.integers(2, 16),
    signed=st.booleans(),
    symmetric=st.booleans(),
    narrow_range=st.booleans(),
    scale_kind=st.sampled_from(["float", "pow2"]),
)
ranges = st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)).map(sorted)


@settings(max_examples=200, deadline=None)
@given(spec=specs, lohi=ranges, data=st.data())
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(spec, lohi, data):
    lo, hi = lohi
    assume(hi - lo > 1e-3)
    scale, zp = qparams(lo, hi, spec)
    # The representable interval of this grid; every value inside it is rounded, never clipped.
    rep_lo = float(dequantize(np.array(spec.qmin), scale, zp, spec))
    rep_hi = float(dequantize(np.array(spec.qmax), scale, zp, spec))
    x = np.array(data.draw(st.lists(st.floats(rep_lo, rep_hi, width=32), min_size=1, max_size=50)), np.float32)
    err = np.abs(fake_quant(x, scale, zp, spec).astype(np.float64) - x)
    # float32 arithmetic of x / scale adds a relative error of a few ulps on top of scale / 2.
    assert np.all(err <= float(scale) * 0.5 * (1 + 1e-5) + 4 * np.spacing(np.abs(x).astype(np.float32)))


@settings(max_examples=200, deadline=None)
@given(spec=specs, lohi=ranges, xs=st.lists(st.floats(-2e3, 2e3, width=32), min_size=1, max_size=50))
def test_fake_quant_is_idempotent(spec, lohi, xs):
    scale, zp = qparams(*lohi, spec)
    once = fake_quant(np.array(xs, np.float32), scale, zp, spec)
    np.testing.assert_array_equal(fake_quant(once, scale, zp, spec), once)


@settings(max_examples=200, deadline=None)
@given(spec=specs.filter(lambda s: not s.symmetric), lohi=ranges)
def test_asymmetric_range_always_contains_zero_exactly(spec, lohi):
    scale, zp = qparams(*lohi, spec)
    assert spec.qmin <= int(zp) <= spec.qmax
    assert fake_quant(np.zeros(1, np.float32), scale, zp, spec)[0] == 0.0


def test_one_sided_range_is_widened_to_contain_zero():
    spec = QuantSpec(signed=False, symmetric=False)
    scale, zp = qparams(2.5, 3.5, spec)
    assert int(zp) == 0
    assert float(scale) == pytest.approx(3.5 / 255)
    scale, zp = qparams(-3.5, -2.5, spec)
    assert int(zp) == 255


def test_symmetric_int8_is_tensorrt_scale_and_uint8_symmetric_is_shifted_int8():
    s8, z8 = qparams(-0.5, 2.0, QuantSpec())
    assert float(s8) == np.float32(2.0 / 127) and int(z8) == 0
    su, zu = qparams(-0.5, 2.0, QuantSpec(signed=False))
    assert float(su) == float(s8) and int(zu) == 128
    x = np.linspace(-3, 3, 101, dtype=np.float32)
    q8 = quantize(x, s8, z8, QuantSpec()).astype(int)
    qu = quantize(x, su, zu, QuantSpec(signed=False)).astype(int)
    np.testing.assert_array_equal(qu - 128, q8)


def test_narrow_range_drops_the_lowest_code():
    spec = QuantSpec(narrow_range=True)
    assert (spec.qmin, spec.qmax) == (-127, 127)
    assert quantize(np.array([-1e9], np.float32), np.float32(1), np.int8(0), spec)[0] == -127
    assert (QuantSpec(bits=4, narrow_range=True).qmin, QuantSpec(bits=4).qmin) == (-7, -8)
    assert QuantSpec(signed=False, narrow_range=True).qmin == 1


def test_pow2_scales_are_powers_of_two_and_cover_the_range():
    rng = np.random.default_rng(1)
    lo = -rng.uniform(0.01, 100, 50)
    hi = rng.uniform(0.01, 100, 50)
    for spec in (QuantSpec(axis=0, scale_kind="pow2"), QuantSpec(axis=0, scale_kind="pow2", symmetric=False)):
        scale, _zp = qparams(lo, hi, spec)
        mantissa, _ = np.frexp(scale)
        assert np.all(mantissa == 0.5)
        float_scale, _ = qparams(lo, hi, spec.replace(scale_kind="float"))
        assert np.all(scale >= float_scale) and np.all(scale < 2 * float_scale)


def test_zero_range_gets_scale_one():
    scale, zp = qparams(np.zeros(3), np.zeros(3), QuantSpec(axis=0))
    np.testing.assert_array_equal(scale, [1, 1, 1])
    np.testing.assert_array_equal(zp, [0, 0, 0])


def test_per_channel_scales_follow_each_channel():
    w = np.array([[1.0, -2.0, 0.5], [0.1, 0.05, -0.02]], np.float32)
    scale, _zp = qparams_from_tensor(w, QuantSpec(axis=0))
    np.testing.assert_allclose(scale, np.float32([2.0 / 127, 0.1 / 127]))
    scale1, _ = qparams_from_tensor(w, QuantSpec(axis=1))
    np.testing.assert_allclose(scale1, np.float32([1.0, 2.0, 0.5]) / 127)


def test_per_group_error_is_smaller_than_per_channel_on_outlier_blocks():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    w[:, :4] *= 50  # one block of outliers per row
    errs = {}
    for name, spec in {
        "channel": QuantSpec(bits=4, axis=0),
        "group": QuantSpec(bits=4, axis=1, group_size=32),
    }.items():
        scale, zp = qparams_from_tensor(w, spec)
        errs[name] = float(np.mean((fake_quant(w, scale, zp, spec) - w) ** 2))
    assert errs["group"] < 0.5 * errs["channel"]


def test_stochastic_rounding_is_floor_or_ceil_unbiased_and_seeded():
    spec = QuantSpec(rounding="stochastic", seed=7)
    x = np.full(20000, 0.3, np.float32)
    q = quantize(x, np.float32(1.0), np.int8(0), spec)
    assert set(np.unique(q)) == {0, 1}
    assert q.mean() == pytest.approx(0.3, abs=0.02)
    np.testing.assert_array_equal(q, quantize(x, np.float32(1.0), np.int8(0), spec))
    other = quantize(x, np.float32(1.0), np.int8(0), spec.replace(seed=8))
    assert not np.array_equal(q, other)
    exact = quantize(np.array([2.0, -3.0], np.float32), np.float32(1.0), np.int8(0), spec)
    np.testing.assert_array_equal(exact, [2, -3])  # representable values are never moved


def test_binarization_is_sign_times_mean_abs_per_channel():
    w = np.array([[1.0, -3.0, 2.0], [-0.5, 0.0, 0.5]], np.float32)
    np.testing.assert_allclose(binarize(w, axis=0), [[2, -2, 2], [-1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(binarize(w), np.sign(w + (w == 0)) * np.abs(w).mean(), rtol=1e-6)
    spec = QuantSpec(bits=1, axis=0)
    assert (spec.qmin, spec.qmax) == (-1, 1)
    np.testing.assert_allclose(binary_scale(w, spec), [2.0, 1 / 3], rtol=1e-6)
    with pytest.raises(SpecError, match="binary_scale"):
        qparams(-1, 1, spec)


def test_stochastic_binarization_is_unbiased():
    spec = QuantSpec(bits=1, rounding="stochastic", seed=0)
    x = np.full(20000, 0.5, np.float32)
    q = quantize(x, np.float32(1.0), np.int8(0), spec)
    assert set(np.unique(q)) == {-1, 1}
    assert q.mean() == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 0}, r"bits must be an integer from 1 to 16, got 0"),
        ({"bits": 17}, r"bits must be an integer from 1 to 16"),
        ({"bits": 8.0}, r"bits must be an integer"),
        ({"bits": True}, r"bits must be an integer"),
        ({"signed": "yes"}, r"signed must be True or False"),
        ({"rounding": "round"}, r"rounding must be one of 'nearest', 'stochastic', got 'round'"),
        ({"scale_kind": "log"}, r"scale_kind must be one of 'float', 'pow2'"),
        ({"group_size": 32}, r"group_size needs an axis"),
        ({"axis": 0, "group_size": 0}, r"group_size must be a positive integer"),
        ({"axis": 1.5}, r"axis must be None"),
        ({"seed": -1}, r"seed must be None or a non-negative integer"),
        ({"bits": 1, "symmetric": False}, r"bits=1 is binarization"),
    ],
)
def test_invalid_spec_fails_at_construction_naming_the_field(kwargs, match):
    with pytest.raises(SpecError, match=match):
        QuantSpec(**kwargs)


def test_spec_is_frozen_and_round_trips_through_a_dict():
    spec = QuantSpec(bits=4, axis=1, group_size=32)
    with pytest.raises(AttributeError):
        spec.bits = 8
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="unknown QuantSpec field"):
        QuantSpec.from_dict({"nbits": 4})


def test_parameters_that_do_not_fit_the_tensor_are_a_clear_error():
    x = np.zeros((4, 6), np.float32)
    with pytest.raises(SpecError, match=r"expected scale of shape \(4,\)"):
        quantize(x, np.ones(6, np.float32), np.zeros(6, np.int8), QuantSpec(axis=0))
    with pytest.raises(SpecError, match="axis 2 is out of range for a tensor of rank 2"):
        quantize(x, np.ones(4, np.float32), np.zeros(4, np.int8), QuantSpec(axis=2))
    with pytest.raises(SpecError, match="per-tensor spec needs one scale"):
        quantize(x, np.ones(4, np.float32), np.int8(0), QuantSpec())
    with pytest.raises(SpecError, match="NaN or Inf"):
        qparams(0.0, np.inf, QuantSpec())
    with pytest.raises(SpecError, match="empty tensor"):
        qparams_from_tensor(np.zeros((0, 3)), QuantSpec())
