"""GPTQ rounding: the input second moment it gathers, and the output error its codes leave."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lowbit.errors import SpecError
from lowbit.onnx import Options, gptq, placement, rewrite
from lowbit.onnx.collect import collect
from lowbit.onnx.graph import Graph
from lowbit.onnx.model import preprocess
from lowbit.onnx.pipeline import quantize
from lowbit.onnx.rounding import GPTQ
from lowbit.onnx.settings import edit
from lowbit.recipe import preset
from tests.onnx import models


def _run(model, feeds):
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _layer(model):
    graph = Graph(model)
    plan = placement.plan(graph, "ort")
    (layer,) = gptq.layers(graph, plan)
    return graph, layer


LAYERS = [
    ("Conv", (6, 4, 3, 3), (3, 4, 9, 9), {"pads": [1, 0, 2, 1]}),
    ("Conv", (6, 4, 3, 3), (3, 4, 10, 9), {"strides": [2, 3], "dilations": [2, 1]}),
    ("Conv", (6, 2, 3, 3), (3, 4, 8, 8), {"group": 2, "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("Conv", (4, 1, 5, 5), (3, 4, 8, 8), {"group": 4, "auto_pad": "SAME_LOWER"}),  # depthwise
    ("Conv", (6, 4, 1, 1), (3, 4, 5, 5), {}),  # pointwise: the GEMM path
    ("Conv", (6, 2, 1, 1), (3, 4, 5, 5), {"group": 2}),
    ("Conv", (6, 4, 3), (3, 4, 11), {"pads": [1, 1]}),  # 1-D
    ("Gemm", (6, 4), (7, 4), {"transB": 1}),
    ("Gemm", (4, 6), (7, 4), {}),
    ("MatMul", (4, 6), (2, 5, 4), {}),  # 3-D input: every token is a row
]


@pytest.mark.parametrize(("op", "w_shape", "x_shape", "attrs"), LAYERS)
def test_second_moment_gives_the_mean_square_output(op, w_shape, x_shape, attrs):
    """With every row kept, w_c^T H w_c is the mean square of output channel c over all positions: check it
    against ONNX Runtime's output of the layer (padding, strides, dilations, groups included)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = rng.standard_normal(x_shape).astype(np.float32) + 0.5
    model, _ = models.single_layer(op, w, x_shape, **attrs)
    _, layer = _layer(model)
    moment = gptq.SecondMoment(layer, rows_per_batch=10**9)
    moment.update(x[:1])
    moment.update(x[1:])
    y = _run(model, {"x": x}).astype(np.float64)
    y = np.moveaxis(y, 1, 0).reshape(y.shape[1], -1) if op == "Conv" else y.reshape(-1, y.shape[-1]).T
    expected = (y**2).mean(axis=1)
    m = layer.matrix(w.astype(np.float64))  # (G, R, D)
    got = np.einsum("grd,gde,gre->gr", m, moment.value, m).reshape(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_array_equal(layer.unmatrix(m), w)


def test_second_moment_samples_a_bounded_number_of_rows():
    w = np.ones((4, 1, 3, 3), np.float32)
    model, _ = models.single_layer("Conv", w, (2, 4, 30, 30), group=4, pads=[1, 1, 1, 1])
    _, layer = _layer(model)
    x = np.random.default_rng(1).standard_normal((2, 4, 30, 30)).astype(np.float32)
    moment = gptq.SecondMoment(layer)
    moment.update(x)
    assert moment.count == 128  # H has 9 x 9 entries per channel: 128 rows estimate it, not all 1,800
    moment = gptq.SecondMoment(layer, rows_per_batch=50)
    moment.update(x)
    assert moment.count == 50
    with pytest.raises(ValueError, match="no data"):
        _ = gptq.SecondMoment(layer).value


def _output_error(layer, w, codes, scale, h):
    delta = layer.matrix(codes.astype(np.float64) * scale.reshape(-1, *[1] * (w.ndim - 1)) - w)
    return np.einsum("grd,gde,gre->", delta, h, delta)


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_gptq_codes_leave_less_output_error_than_nearest(op):
    """On correlated inputs (a smooth signal, like an image) GPTQ's codes give a much smaller output error
    E|(W_q - W) x|^2 than nearest rounding, at the same scales and within [-127, 127]."""
    rng = np.random.default_rng(2)
    if op == "Conv":
        w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * 3
        base = rng.standard_normal((4, 8, 1, 1))
        x = (base + 0.05 * rng.standard_normal((4, 8, 16, 16))).astype(np.float32)  # nearly constant patches
        model, _ = models.single_layer(op, w, x.shape, group=8, pads=[1, 1, 1, 1])
    else:
        w = rng.standard_normal((16, 32)).astype(np.float32)
        x = (rng.standard_normal((400, 1)) + 0.1 * rng.standard_normal((400, 32))).astype(np.float32)
        model, _ = models.single_layer(op, w, x.shape, transB=1)
    graph, layer = _layer(model)
    moment = gptq.SecondMoment(layer)
    moment.update(x)
    p, nearest = rewrite.weight_qparams(w, layer.axis)
    codes = gptq.codes(graph, [moment])["w"]
    assert codes.dtype == np.int8 and codes.shape == w.shape and np.abs(codes).max() <= 127
    assert not np.array_equal(codes, nearest)
    h = moment.value
    assert _output_error(layer, w, codes, p.scale, h) < 0.5 * _output_error(layer, w, nearest, p.scale, h)


def test_too_few_rows_keep_nearest_rounding():
    """A Gemm with 64 input features seen on 100 samples: H is poorly known, so the weight keeps nearest rounding."""
    rng = np.random.default_rng(3)
    model, _ = models.single_layer("Gemm", rng.standard_normal((8, 64)).astype(np.float32), (100, 64), transB=1)
    graph, layer = _layer(model)
    moment = gptq.SecondMoment(layer)
    moment.update(rng.standard_normal((100, 64)).astype(np.float32))
    assert gptq.codes(graph, [moment]) == {}


def _written_weight(path) -> np.ndarray:
    """The dequantized weight ``w`` of a quantized single-layer model, read from its initializers."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    codes, scale = inits["w_quantized"], inits["w_scale"]
    return codes.astype(np.float32) * scale.reshape(-1, *[1] * (codes.ndim - 1))


def test_quantize_writes_the_gptq_codes(tmp_path):
    """A depthwise convolution of large-gain zero-sum kernels (edge detectors) on a smooth input, the case that
    costs EfficientNet-Lite0 most: the weights quantize() writes with GPTQ, put back into the float model, give
    held-out outputs with less than half the error of nearest rounding's."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 1, 3, 3))
    w = (10 * (w - w.mean(axis=(2, 3), keepdims=True))).astype(np.float32)
    shape = ("N", 8, 12, 12)
    src = models.save(models.single_layer("Conv", w, shape, group=8, pads=[1, 1, 1, 1])[0], tmp_path / "dw.onnx")
    ramp = np.linspace(0, 1, 12)
    smooth = rng.uniform(0, 2, (96, 8, 1, 1)) * (1 + ramp[None, None, :, None] * ramp[None, None, None, :])
    x = (smooth + 0.01 * rng.standard_normal((96, 8, 12, 12))).astype(np.float32)
    calib, test = x[:64], x[64:]
    ref = _run(src, {"x": test}).astype(np.float64)
    errors, results = {}, {}
    for rounding in ("gptq", "nearest"):
        out = tmp_path / f"q_{rounding}.onnx"
        results[rounding] = quantize(
            src,
            out,
            {"x": calib},
            edit(preset("int8"), rounding=rounding, bias_correction=False),
            options=Options(compare=False, progress=False),
        )
        onnx.checker.check_model(onnx.load(str(out)))
        weight_only, _ = models.single_layer("Conv", _written_weight(out), shape, group=8, pads=[1, 1, 1, 1])
        errors[rounding] = np.mean((_run(weight_only, {"x": test}) - ref) ** 2)
    assert results["gptq"].rounded_layers == 1 and results["nearest"].rounded_layers == 0
    assert errors["gptq"] < 0.5 * errors["nearest"]
    with pytest.raises(SpecError, match="unknown weight rounding 'up'"):
        quantize(src, tmp_path / "bad.onnx", {"x": calib}, replace(preset("int8"), rounding="up"))


def test_a_dead_input_column_keeps_its_nearest_code():
    """Column 0 is always zero on the calibration data: GPTQ moves every other column, but column 0 keeps the
    code nearest to its weight, so the layer still works if deployment data wakes that input."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    x = rng.standard_normal((400, 1)) + 0.1 * rng.standard_normal((400, 16))
    x[:, 0] = 0.0
    model, _ = models.single_layer("Gemm", w, x.shape, transB=1)
    graph, layer = _layer(model)
    moment = gptq.SecondMoment(layer)
    moment.update(x.astype(np.float32))
    codes = gptq.codes(graph, [moment])["w"]
    _, nearest = rewrite.weight_qparams(w, layer.axis)
    np.testing.assert_array_equal(codes[:, 0], nearest[:, 0])
    assert not np.array_equal(codes[:, 1:], nearest[:, 1:])


def test_gptq_codes_show_a_bar_per_layer(capsys):
    rng = np.random.default_rng(3)
    model, _ = models.single_layer("Gemm", rng.standard_normal((8, 4)).astype(np.float32), (100, 4), transB=1)
    graph, layer = _layer(model)
    moment = gptq.SecondMoment(layer)
    moment.update(rng.standard_normal((100, 4)).astype(np.float32))
    assert set(gptq.codes(graph, [moment], progress=False)) == {"w"}
    assert capsys.readouterr().err == ""
    gptq.codes(graph, [moment])
    assert "GPTQ rounding" in capsys.readouterr().err


def _int8_codes(model, feeds, budget):
    """The int8 path's GPTQ codes of ``model`` (rounding.GPTQ at ``budget`` bytes of second moments): the first
    pass's moments fed as the calibration pass feeds them, the rest gathered by more passes over ``feeds``."""
    graph = Graph(model)
    plan = placement.plan(graph, "ort")
    method = GPTQ()
    method.budget = budget
    observers = method.observers(graph, plan, None)
    seen: dict[str, list] = {}
    for x, m in observers:
        seen.setdefault(x, []).append(m)
    collect(model, [], feeds, observers=seen, progress=False)
    scales = {layer.weight: None for group in method.passes for layer in group}
    method.rerun = (model, lambda: feeds)
    codes = method.codes(graph, observers, scales, progress=False)
    return codes, method


def test_the_int8_path_gathers_what_does_not_fit_the_budget_in_more_passes_with_the_same_codes():
    model = preprocess(models.attention_block(hidden=32))  # shapes inferred: every activation's type known
    data = models.attention_feeds(n=96, tokens=12, hidden=32)
    feeds = [{k: v[i : i + 16] for k, v in data.items()} for i in range(0, 96, 16)]
    one, method_one = _int8_codes(model, feeds, gptq.HESSIAN_BUDGET)
    split, method_split = _int8_codes(model, feeds, 8 * 32 * 32)
    assert len(method_one.passes) == 1 and len(method_split.passes) == 4
    assert method_split.peak_bytes == 8 * 128 * 128 < method_one.peak_bytes
    assert set(one) == set(split) and len(one) == 6  # q, k, v, o, up and down (1,152 rows for 128 inputs)
    for name in one:
        np.testing.assert_array_equal(one[name], split[name])


def test_layers_of_any_width_are_gptq_layers():
    """No cap on the number of inputs (4,096 before the budgeted passes)."""
    w = np.zeros((4100, 2), np.float32)
    graph = Graph(models.single_layer("MatMul", w, ("N", 4100))[0])
    (layer,) = gptq.layers(graph, placement.plan(graph, "ort"))
    assert gptq.hessian_bytes(layer) == 8 * 4100 * 4100 < gptq.HESSIAN_BUDGET
    assert [len(p) for p in gptq.passes([layer, layer], budget=gptq.hessian_bytes(layer))] == [2]  # one shared H
