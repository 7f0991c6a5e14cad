"""--fp16-rest: the float remainder of a quantized model in FP16, quantizers and graph I/O in FP32."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from lowbit.onnx import Options, fp16
from lowbit.onnx.pipeline import quantize
from lowbit.onnx.settings import edit
from lowbit.recipe import preset
from tests.onnx import models


@pytest.fixture
def quantized(tmp_path):
    model = models.save(models.convnet(), tmp_path / "convnet.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 16, 16))
    out = tmp_path / "q.onnx"
    quantize(
        model,
        out,
        data,
        edit(preset("int8"), target="trt", exclude=["conv2"]),
        options=Options(compare=False, progress=False),
    )
    return onnx.load(str(out))


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


def test_the_float_remainder_runs_in_fp16_and_the_quantizers_in_fp32(quantized):
    half, converted = fp16.convert(quantized)
    onnx.checker.check_model(half, full_check=True)
    types = _types(half)
    nodes = {n.name: n for n in half.graph.node}
    assert "conv2" in converted and "fc" in converted  # the excluded Conv and the other float compute
    assert types[nodes["conv2"].input[1]] == TensorProto.FLOAT16  # its weight is stored in FP16
    assert types[nodes["conv2"].output[0]] == TensorProto.FLOAT16
    for node in half.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert types[node.input[1]] == TensorProto.FLOAT  # scales stay FP32
            if node.op_type == "QuantizeLinear":
                assert types[node.input[0]] == TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [TensorProto.FLOAT]
    assert any(n.op_type == "Cast" for n in half.graph.node)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    ref = _run(quantized, x)
    got = _run(half, x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0.02, atol=0.02)


def test_quantize_with_fp16_rest_writes_a_checked_model(tmp_path):
    model = models.save(models.convnet(), tmp_path / "convnet.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 16, 16))
    out = tmp_path / "q16.onnx"
    result = quantize(
        model,
        out,
        data,
        edit(preset("int8"), target="trt", fp16_rest=True),
        options=Options(compare=False, progress=False),
    )
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    assert result.fp16_nodes
    halves = [t for t in q.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert halves and all(numpy_helper.to_array(t).dtype == np.float16 for t in halves)
