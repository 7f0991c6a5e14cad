"""Bias correction: the per-channel mean shift that weight rounding causes, measured and removed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from lowbit.onnx import Options, placement, rewrite
from lowbit.onnx import bias_correction as bc
from lowbit.onnx.graph import Graph
from lowbit.onnx.pipeline import quantize
from lowbit.onnx.settings import edit
from lowbit.recipe import preset
from tests.onnx import models


def _run(model, feeds):
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_channel_mean_over_batches_matches_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 4, 5)) + np.arange(3)[:, None, None] for n in (2, 5, 1)]
    for axis in (1, -1):
        m = bc.ChannelMean(axis)
        for b in batches:
            m.update(b)
        whole = np.concatenate(batches)
        other = tuple(a for a in range(4) if a != axis % 4)
        np.testing.assert_allclose(m.mean, whole.mean(axis=other))
    with pytest.raises(ValueError, match="no data"):
        _ = bc.ChannelMean(1).mean


@pytest.mark.parametrize(
    ("op", "w_shape", "x_shape", "attrs"),
    [
        ("Conv", (6, 4, 3, 3), (5, 4, 7, 7), {}),
        ("Conv", (6, 2, 3, 3), (5, 4, 7, 7), {"group": 2}),
        ("Conv", (4, 1, 3, 3), (5, 4, 7, 7), {"group": 4}),  # depthwise
        ("Conv", (6, 4, 3), (5, 4, 9), {}),  # 1-D
        ("Gemm", (6, 4), (5, 4), {"transB": 1}),
        ("Gemm", (4, 6), (5, 4), {"transB": 0, "alpha": 0.5}),
    ],
)
def test_shift_is_the_mean_change_of_the_output(op, w_shape, x_shape, attrs):
    """With inputs constant over space (no padding), the mean output change that quantizing the weights causes is
    exactly (W_q - W) E[x]; check shift() against ONNX Runtime running both weights."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = rng.uniform(0, 2, x_shape[:2]).astype(np.float32)
    x = np.broadcast_to(x.reshape(*x.shape, *[1] * (len(x_shape) - 2)), x_shape).copy()
    model, _ = models.single_layer(op, w, x_shape, **attrs)
    graph = Graph(model)
    plan = placement.plan(graph, "ort")
    w_q = rewrite.dequantized_weights(model, plan)["w"]
    assert not np.array_equal(w_q, w)
    layer = next(iter(bc.layers(graph, plan)))
    mean = bc.ChannelMean(layer.axis)
    mean.update(x)
    got = bc.shift(graph, layer, w_q, mean.mean)
    quantized, _ = models.single_layer(op, w_q, x_shape, **attrs)
    diff = _run(quantized, {"x": x}).astype(np.float64) - _run(model, {"x": x})
    channel_axis = 1
    expected = diff.mean(axis=tuple(a for a in range(diff.ndim) if a != channel_axis))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


def test_bias_correction_removes_most_of_the_mean_output_error(tmp_path):
    model = models.save(models.depthwise_net(), tmp_path / "dw.onnx")
    x = np.random.default_rng(2).uniform(0, 2, (64, 4, 12, 12)).astype(np.float32)  # a mean far from 0
    ref = _run(model, {"x": x}).astype(np.float64)
    errors = {}
    for corrected in (False, True):
        out = tmp_path / f"q_{corrected}.onnx"
        result = quantize(
            model,
            out,
            {"x": x},
            edit(preset("int8"), bias_correction=corrected, rounding="nearest"),
            options=Options(compare=False, progress=False),
        )
        errors[corrected] = np.abs((_run(str(out), {"x": x}) - ref).mean(axis=0)).mean()
        if corrected:
            assert set(result.bias_corrections) == {"expand", "depthwise", "grouped", "fc"}
        else:
            assert result.bias_corrections == {}
    assert errors[True] < 0.5 * errors[False]


def test_a_layer_without_bias_gains_an_int32_one(tmp_path):
    model = models.save(models.depthwise_net(), tmp_path / "dw.onnx")
    x = np.random.default_rng(3).uniform(0, 2, (16, 4, 12, 12)).astype(np.float32)
    out = tmp_path / "q.onnx"
    quantize(model, out, {"x": x}, "int8", options=Options(compare=False, progress=False))
    q = onnx.load(str(out))
    onnx.checker.check_model(q)
    expand = next(n for n in q.graph.node if n.name == "expand")
    assert len(expand.input) == 3
    producer = next(n for n in q.graph.node if expand.input[2] in n.output)
    assert producer.op_type == "DequantizeLinear"
    codes = next(t for t in q.graph.initializer if t.name == producer.input[0])
    assert codes.data_type == TensorProto.INT32
    names = {t.name for t in q.graph.initializer}
    assert "b_dw" not in names and "b_group" not in names  # the replaced float biases are gone
