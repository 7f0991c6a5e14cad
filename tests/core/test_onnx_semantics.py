"""lowbit's quantize/dequantize give the integer codes ONNX QuantizeLinear/DequantizeLinear give, exactly."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core import QuantSpec, dequantize, param_shape, qparams, qparams_from_tensor, quantize

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

ONNX_TYPES = {
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
    (16, True): TensorProto.INT16,
    (16, False): TensorProto.UINT16,
    (4, True): TensorProto.INT4,
    (4, False): TensorProto.UINT4,
}


def _onnx_qdq(x, scale, zp, spec):
    """Run QuantizeLinear then DequantizeLinear in the ONNX reference evaluator."""
    qtype = ONNX_TYPES[(spec.bits, spec.signed)]
    attrs = {}
    if spec.axis is not None:
        attrs["axis"] = spec.axis
    if spec.group_size is not None:
        attrs["block_size"] = spec.group_size
    opset = 21 if (spec.group_size is not None or spec.bits == 4) else 19
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    zp_t = helper.make_tensor("z", qtype, zp.shape, np.asarray(zp).astype(np.int64).ravel().tolist())
    s_t = helper.make_tensor("s", TensorProto.FLOAT, scale.shape, np.asarray(scale).ravel().tolist())
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [
            helper.make_tensor_value_info("q", qtype, x.shape),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape),
        ],
        initializer=[s_t, zp_t],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    q, y = ReferenceEvaluator(model).run(None, {"x": x})
    return np.asarray(q).astype(np.int64), np.asarray(y)


def _check(x, spec):
    scale, zp = qparams_from_tensor(x, spec)
    assert scale.shape == param_shape(x.shape, spec)
    q = quantize(x, scale, zp, spec)
    assert q.dtype == spec.dtype
    ref_q, ref_y = _onnx_qdq(x, scale, zp, spec)
    np.testing.assert_array_equal(q.astype(np.int64), ref_q)
    np.testing.assert_array_equal(dequantize(q, scale, zp, spec), ref_y)


CASES = [
    QuantSpec(),
    QuantSpec(signed=False, symmetric=False),
    QuantSpec(symmetric=False),
    QuantSpec(signed=False),
    QuantSpec(narrow_range=True),
    QuantSpec(bits=16, symmetric=False),
    QuantSpec(bits=16, signed=False, symmetric=False),
    QuantSpec(axis=0),
    QuantSpec(axis=1, signed=False, symmetric=False),
    QuantSpec(axis=-1),
    QuantSpec(bits=4),
    QuantSpec(bits=4, signed=False, symmetric=False),
    QuantSpec(bits=4, axis=1, group_size=4),
    QuantSpec(bits=4, axis=1, group_size=5),  # the last block is shorter
    QuantSpec(bits=8, axis=0, group_size=2, symmetric=False),
    QuantSpec(scale_kind="pow2"),
    QuantSpec(scale_kind="pow2", signed=False, symmetric=False),
]


@pytest.mark.parametrize("spec", CASES, ids=repr)
def test_codes_equal_onnx_reference(spec):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 12, 3)) * rng.uniform(0.1, 10, size=(6, 1, 1))).astype(np.float32)
    _check(x, spec)


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(signed=False, symmetric=False)], ids=repr)
def test_out_of_range_values_saturate_like_onnx(spec):
    x = np.array([-1e6, -3.0, -0.0, 0.0, 2.5, 1e6], dtype=np.float32)
    scale, zp = qparams(-3.0, 3.0, spec)
    q = quantize(x, scale, zp, spec)
    ref_q, _ = _onnx_qdq(x, scale, zp, spec)
    np.testing.assert_array_equal(q.astype(np.int64), ref_q)
    assert q.min() == spec.qmin and q.max() == spec.qmax
    # x / scale overflows float32 here; the reference's int32 cast is undefined, lowbit saturates.
    huge = quantize(np.array([3.0e38, -3.0e38], dtype=np.float32), scale, zp, spec)
    np.testing.assert_array_equal(huge, [spec.qmax, spec.qmin])


def test_ties_round_half_to_even_like_onnx():
    spec = QuantSpec()
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], dtype=np.float32)
    q = quantize(x, np.float32(1.0), np.int8(0), spec)
    np.testing.assert_array_equal(q, [0, 2, 2, 0, -2, -2])
    ref_q, _ = _onnx_qdq(x, np.array(1.0, np.float32), np.array(0, np.int8), spec)
    np.testing.assert_array_equal(q, ref_q)


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(finite, min_size=1, max_size=64),
    spec=st.builds(
        QuantSpec,
        bits=st.sampled_from([4, 8, 16]),
        signed=st.booleans(),
        symmetric=st.booleans(),
        narrow_range=st.booleans(),
        scale_kind=st.sampled_from(["float", "pow2"]),
    ),
)
def test_property_codes_equal_onnx_reference(data, spec):
    _check(np.array(data, dtype=np.float32), spec)
