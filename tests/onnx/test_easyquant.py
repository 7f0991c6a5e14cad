"""EasyQuant for ONNX models (refine="easyquant"): layer by layer with the quantized model upstream, scales searched
for the cosine of each layer's output to FP32, never below the start's; the chosen scales reach the built model,
the ranges file and the TensorRT cache."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from lowbit.cli import main
from lowbit.errors import CalibrationError
from lowbit.onnx import Options, easyquant
from lowbit.onnx.collect import with_outputs
from lowbit.onnx.pipeline import quantize
from lowbit.recipe import preset
from tests.onnx import models

# MinMax ranges and nearest codes (what the search itself sees): on heavy-tailed inputs MinMax wastes the grid
PLAIN = replace(preset("int8").with_method("minmax"), rounding="nearest", bias_correction=False)


def _heavy_tailed(path, n: int, seed: int = 1) -> str:
    np.savez(path, x=np.random.default_rng(seed).standard_t(2, (n, 3, 16, 16)).astype(np.float32))
    return str(path)


def _with_outliers(model: onnx.ModelProto) -> onnx.ModelProto:
    """convnet with one large weight in most output channels of conv2: their max scales waste most of the grid."""
    for init in model.graph.initializer:
        if init.name == "w2":
            w = numpy_helper.to_array(init).copy()
            w[:6, 0, 0, 0] = 3.0
            init.CopyFrom(numpy_helper.from_array(w, "w2"))
    return model


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(path, x, outputs=None):
    model = onnx.load(str(path))
    if outputs:
        model = with_outputs(model, outputs)
    return _session(model).run(outputs, {"x": x})


def _cos(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eq")
    src = models.save(_with_outliers(models.convnet()), tmp / "m.onnx")
    data = _heavy_tailed(tmp / "calib.npz", 48)
    out = tmp / "eq.onnx"
    result = quantize(
        src,
        out,
        data,
        replace(PLAIN, refine="easyquant"),
        options=Options(progress=False, compare=False, trt_cache=tmp / "c.cache"),
    )
    base = tmp / "base.onnx"
    quantize(src, base, data, PLAIN, options=Options(progress=False, compare=False))
    return src, data, out, base, result, tmp


def test_every_layer_keeps_or_raises_its_cosine_and_the_built_model_shows_it(refined):
    src, data, out, _, result, _ = refined
    record = json.loads(out.with_suffix(".ranges.json").read_text())
    layers = record["easyquant"]["layers"]
    assert [r["name"] for r in layers] == ["conv1", "conv2", "fc"] and record["easyquant"]["samples"] == 48
    assert all(r["cosine_after"] >= r["cosine_before"] for r in layers)
    assert any(r["cosine_after"] > r["cosine_before"] + 1e-4 for r in layers)
    assert result.refinement.startswith("easyquant on 3 layers (48 samples")
    # An independent recomputation: conv2 alone, its input as the built model feeds it and its weight as the built
    # model dequantizes it, against the float conv2 on the float input.
    x = np.load(data)["x"]
    float_in, float_out = _run(src, x, ["p1", "c2"])
    q = onnx.load(str(out))
    quant_in = _session(with_outputs(q, ["p1"])).run(["p1"], {"x": x})[0]
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "w2")
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    w = inits[dq.input[0]].astype(np.float32) * inits[dq.input[1]].reshape(-1, 1, 1, 1)
    b = numpy_helper.to_array(next(i for i in onnx.load(src).graph.initializer if i.name == "b2"))
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [conv], "c", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    layer = _session(helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)]))
    ours = _cos(layer.run(None, {"x": quant_in})[0], float_out)
    reported = next(r for r in layers if r["name"] == "conv2")["cosine_after"]
    assert ours == pytest.approx(reported, abs=2e-4)
    assert float_in.shape == quant_in.shape


def test_scales_move_within_the_span_and_reach_the_ranges_file_and_the_cache(refined):
    _, _, out, base, _, tmp = refined
    ours = json.loads(out.with_suffix(".ranges.json").read_text())
    theirs = json.loads(base.with_suffix(".ranges.json").read_text())
    moved = False
    for name, w in ours["weights"].items():
        ratio = np.array(w["scale"]) / np.array(theirs["weights"][name]["scale"])
        assert np.all((ratio >= 0.5 - 1e-6) & (ratio <= 2.0 + 1e-6)), name
        moved |= bool(np.any(np.abs(ratio - 1) > 1e-6))
    assert moved
    for r in ours["easyquant"]["layers"]:
        if r["activation_factor"] is not None:
            assert 0.5 - 1e-9 <= r["activation_factor"] <= 2 + 1e-9
    cache = dict(line.split(": ") for line in (tmp / "c.cache").read_text().splitlines()[1:])
    scale = np.frombuffer(bytes.fromhex(cache["p1"])[::-1], np.float32)[0]
    assert scale == pytest.approx(
        max(-ours["activations"]["p1"]["lo"], ours["activations"]["p1"]["hi"]) / 127, rel=1e-5
    )


def test_matmul_and_gemm_layers_and_the_cli(tmp_path, capsys):
    src = models.save(models.mlp(), tmp_path / "mlp.onnx")
    shape = tuple(d.dim_value for d in onnx.load(src).graph.input[0].type.tensor_type.shape.dim[1:])
    data = models.calib_data(tmp_path / "calib.npz", shape, n=32)
    out = tmp_path / "q.onnx"
    args = ["--calib", data, "--refine", "easyquant", "--rounding", "nearest", "-q", "--no-compare"]
    assert main(["quantize", src, "-o", str(out), *args]) == 0
    printed = capsys.readouterr().out
    assert "easyquant on" in printed and "layers improved" in printed
    record = json.loads(out.with_suffix(".ranges.json").read_text())
    kinds = {n.name: n.op_type for n in onnx.load(src).graph.node}
    assert {kinds[r["name"]] for r in record["easyquant"]["layers"]} >= {"MatMul", "Gemm"}
    assert record["recipe"]["refine"] == "easyquant"
    assert all(r["cosine_after"] >= r["cosine_before"] for r in record["easyquant"]["layers"])


def test_bad_search_settings_are_one_line_errors():
    with pytest.raises(CalibrationError, match="samples must be a positive integer"):
        easyquant.Search(samples=0)
    with pytest.raises(CalibrationError, match="span must be above 1"):
        easyquant.Search(span=1.0)
    grid = easyquant.Search().coarse_factors()
    assert grid[0] == 1.0 and grid.min() == pytest.approx(0.5) and grid.max() == pytest.approx(2.0)


def test_under_gptq_only_the_activation_scales_are_searched(tmp_path):
    src = models.save(_with_outliers(models.convnet()), tmp_path / "m.onnx")
    data = _heavy_tailed(tmp_path / "calib.npz", 32)
    config = preset("int8").with_method("minmax")  # GPTQ codes: scales chosen for nearest codes would fight them
    scales = {}
    for name, cfg in (("base", config), ("eq", replace(config, refine="easyquant"))):
        quantize(src, tmp_path / f"{name}.onnx", data, cfg, options=Options(progress=False, compare=False))
        scales[name] = json.loads((tmp_path / f"{name}.ranges.json").read_text())
    assert {k: w["scale"] for k, w in scales["eq"]["weights"].items()} == {
        k: w["scale"] for k, w in scales["base"]["weights"].items()
    }
    layers = scales["eq"]["easyquant"]["layers"]
    assert layers and all(r["weight_factors"] == [1.0, 1.0] and r["activation_factor"] is not None for r in layers)
    assert [r["name"] for r in layers] == ["conv1", "fc"]  # conv2's input is also the residual Add's
