"""Power-of-two (fixed-point) scales fitted to data: lowbit.core.fitted_qparams."""

import numpy as np
import pytest

from lowbit.core import QuantSpec, fake_quant, fitted_qparams, layout, qparams


def _error(x, scale, zp, spec):
    d = x.astype(np.float64) - fake_quant(x, scale, zp, spec)
    return layout.reduce(d * d, spec, "sum")


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, axis=0, scale_kind="pow2"),
        QuantSpec(bits=8, axis=0, scale_kind="pow2"),
        QuantSpec(bits=4, axis=0, scale_kind="pow2", signed=False, symmetric=False),
        QuantSpec(bits=4, axis=1, group_size=16, scale_kind="pow2"),
        QuantSpec(bits=3, scale_kind="pow2"),
    ],
    ids=["int4", "int8", "uint4-asym", "int4-group", "int3-tensor"],
)
def test_each_slice_takes_the_better_of_the_two_powers_around_its_float_scale(spec):
    x = np.random.default_rng(0).laplace(size=(24, 64)).astype(np.float32)
    lo, hi = layout.reduce(x, spec, "min"), layout.reduce(x, spec, "max")
    if spec.symmetric:
        lo, hi = -np.maximum(-lo, hi), np.maximum(-lo, hi)
    scale, zp = fitted_qparams(x, lo, hi, spec)
    up, up_zp = qparams(lo, hi, spec)
    mantissa, _ = np.frexp(scale)
    assert np.all(mantissa == 0.5)  # powers of two
    assert np.all((scale == up) | (scale == up / 2))
    fitted, ceiling = _error(x, scale, zp, spec), _error(x, up, up_zp, spec)
    assert np.all(fitted <= ceiling)
    down, down_zp = (up / 2).astype(np.float32), zp  # where it chose the larger, the smaller was no better
    kept = np.broadcast_to(scale == up, np.shape(up))
    if spec.symmetric and kept.any():
        assert np.all(_error(x, down, np.zeros_like(down_zp), spec)[kept] >= fitted[kept])
    if spec.bits == 4 and spec.symmetric:  # Laplace tails at 4 bits: clipping to the smaller power pays somewhere
        assert np.any(scale < up)


def test_float_scales_and_other_formats_are_plain_qparams():
    x = np.random.default_rng(1).normal(size=(4, 32)).astype(np.float32)
    spec = QuantSpec(bits=4, axis=0)
    lo, hi = x.min(1), x.max(1)
    np.testing.assert_array_equal(fitted_qparams(x, lo, hi, spec)[0], qparams(lo, hi, spec)[0])
