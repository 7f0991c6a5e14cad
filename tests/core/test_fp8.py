"""FP8 E4M3FN / E5M2 in lowbit.core, checked against two independent oracles: ml_dtypes casts and ONNX's
reference QuantizeLinear / DequantizeLinear."""

import numpy as np
import pytest

from lowbit.core import QuantSpec, dequantize, fake_quant, qparams, quantize, weight_range
from lowbit.errors import SpecError

ml_dtypes = pytest.importorskip("ml_dtypes")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

FORMATS = {
    "fp8_e4m3": (ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E4M3FN, 448.0),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, TensorProto.FLOAT8E5M2, 57344.0),
}


def _random(n, seed, top):
    """Values spread over every binade of the format, both signs, plus exact ties between neighbours."""
    rng = np.random.default_rng(seed)
    mags = np.exp2(rng.uniform(np.log2(top) - 40, np.log2(top) + 1, n))
    return (mags * rng.choice([-1.0, 1.0], n)).astype(np.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_every_code_round_trips(name):
    spec = QuantSpec(format=name)
    codes = np.arange(256, dtype=np.uint8)
    values = dequantize(codes, 1.0, 0, spec)
    oracle = codes.view(FORMATS[name][0]).astype(np.float32)
    np.testing.assert_array_equal(values, oracle)  # NaN at the same places, equal elsewhere
    numbers = ~np.isnan(values) & ~np.isinf(values)
    np.testing.assert_array_equal(quantize(values[numbers], 1.0, 0, spec), codes[numbers])


@pytest.mark.parametrize("name", FORMATS)
def test_rounding_matches_ml_dtypes(name):
    dtype, _, top = FORMATS[name]
    x = _random(20000, 0, top)
    x = x[np.abs(x) <= top]  # ml_dtypes overflows to inf / NaN; lowbit saturates (tested below)
    codes = quantize(x, 1.0, 0, QuantSpec(format=name))
    np.testing.assert_array_equal(codes, x.astype(dtype).view(np.uint8))


@pytest.mark.parametrize("name", FORMATS)
def test_ties_go_to_the_even_code(name):
    spec = QuantSpec(format=name)
    values = dequantize(np.arange(1, 120, dtype=np.uint8), 1.0, 0, spec).astype(np.float64)
    mids = ((values[:-1] + values[1:]) / 2).astype(np.float32)  # exact in float32
    codes = quantize(mids, 1.0, 0, spec)
    assert np.all(codes % 2 == 0)
    np.testing.assert_array_equal(codes, mids.astype(FORMATS[name][0]).view(np.uint8))


@pytest.mark.parametrize("name", FORMATS)
def test_saturates_and_keeps_nan(name):
    top = FORMATS[name][2]
    spec = QuantSpec(format=name)
    x = np.array([top * 1.07, -top * 4, np.inf, -np.inf, np.nan], dtype=np.float32)
    y = fake_quant(x, 1.0, 0, spec)
    np.testing.assert_array_equal(y[:4], [top, -top, top, -top])
    assert np.isnan(y[4])


def _onnx_quantize(x, scale, qtype, axis=None):
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs)
    z_shape = list(np.shape(scale))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", qtype, list(x.shape))],
        [
            helper.make_tensor("s", TensorProto.FLOAT, z_shape, np.ravel(scale).tolist()),
            helper.make_tensor("z", qtype, z_shape, [0.0] * int(np.size(scale))),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return np.asarray(ReferenceEvaluator(model).run(None, {"x": x})[0]).view(np.uint8)


@pytest.mark.parametrize("name", FORMATS)
def test_per_channel_codes_equal_onnx_reference(name):
    _, qtype, top = FORMATS[name]
    x = _random(4 * 500, 1, top).reshape(4, 500) * np.array([[1e-3], [1.0], [7.0], [1e3]], dtype=np.float32)
    x[0, :3] = [np.nan, np.inf, -1e30]  # saturate=1: ONNX's default
    spec = QuantSpec(format=name, axis=0)
    scale, zp = qparams(np.nanmin(np.where(np.isinf(x), 0, x), axis=1), np.full(4, 1.0), spec)
    assert zp.dtype == np.uint8 and not zp.any()
    np.testing.assert_array_equal(quantize(x, scale, zp, spec), _onnx_quantize(x, scale, qtype, axis=0))


def test_qparams_scale_is_amax_over_max():
    scale, zp = qparams(-3.0, 896.0, QuantSpec(format="fp8_e4m3"))
    assert float(scale) == 2.0 and int(zp) == 0
    scale, _ = qparams(np.array([-57344.0, 0.0]), np.array([1.0, 0.0]), QuantSpec(format="fp8_e5m2", axis=0))
    np.testing.assert_array_equal(scale, [1.0, 1.0])  # a zero range gets scale 1
    assert float(qparams(-1.0, 300.0, QuantSpec(format="fp8_e4m3", scale_kind="pow2"))[0]) == 1.0


def test_per_group_layout():
    spec = QuantSpec(format="fp8_e4m3", axis=1, group_size=2)
    x = np.array([[1.0, 2.0, 300.0, -600.0]], dtype=np.float32)
    scale, zp = qparams(np.zeros((1, 2)), np.array([[2.0, 600.0]]), spec)
    y = fake_quant(x, scale, zp, spec)
    np.testing.assert_allclose(y, x, rtol=0.07)


@pytest.mark.parametrize(
    "changes, field",
    [({"bits": 4}, "bits"), ({"symmetric": False}, "symmetric"), ({"signed": False}, "signed"),
     ({"narrow_range": True}, "narrow_range"), ({"rounding": "stochastic"}, "rounding")],
)  # fmt: skip
def test_spec_refuses_what_fp8_cannot_be(changes, field):
    with pytest.raises(SpecError, match=f"QuantSpec.{field} must be"):
        QuantSpec(format="fp8_e4m3", **changes)


def test_weight_methods():
    w = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    spec = QuantSpec(format="fp8_e4m3", axis=0)
    _, hi = weight_range(w, spec, "mse")
    assert np.all(hi <= np.abs(w).max(axis=1) + 1e-6) and np.all(hi > 0)
    with pytest.raises(SpecError, match="ADMM"):
        weight_range(w, spec, "admm")
