"""FP8 (E4M3FN, E5M2) in the ONNX front end: FLOAT8 Q/DQ, FP8 weight initializers, opset 19, ORT at
ORT_DISABLE_ALL, and a one-line refusal for each option that does not fit FP8."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from lowbit import calib
from lowbit.cli import main
from lowbit.core import QuantSpec, dequantize
from lowbit.errors import FormatError
from lowbit.onnx import Budget, Options, fp8
from lowbit.onnx.metrics import OutputMetric
from lowbit.onnx.model import session, session_options
from lowbit.onnx.pipeline import quantize
from lowbit.onnx.settings import QuantizeError, Settings, edit
from lowbit.recipe import preset
from tests.onnx import models

FLOAT8 = {"fp8_e4m3": TensorProto.FLOAT8E4M3FN, "fp8_e5m2": TensorProto.FLOAT8E5M2}
QUIET = Options(compare=False, progress=False)


def _build(tmp_path, config, *, model=None, name="q.onnx", options=QUIET):
    path = models.save(model or models.convnet(), tmp_path / "m.onnx")
    calib = models.calib_data(tmp_path / "c.npz", (3, 16, 16))
    out = tmp_path / name
    quantize(path, out, calib, config, options=options)
    return path, calib, onnx.load(str(out))


def _cosine(a, b) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("target", ["trt", "qdq"])
def test_an_fp8_build_is_float8_qdq_and_runs_as_the_reference_does(tmp_path, fmt, target):
    path, calib, q = _build(tmp_path, edit(preset(fmt), target=target))
    onnx.checker.check_model(q, full_check=True)
    assert fp8.OPSET <= next(op.version for op in q.opset_import if op.domain == "")
    inits = {t.name: t for t in q.graph.initializer}
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert sum(n.op_type == "QuantizeLinear" for n in qdq) >= 3
    assert all(inits[n.input[2]].data_type == FLOAT8[fmt] for n in qdq)  # every zero point FLOAT8
    weights = [inits[n.input[0]] for n in qdq if n.input[0] in inits]
    assert len(weights) == 3 and all(w.data_type == FLOAT8[fmt] for w in weights)
    assert all(len(w.raw_data) == np.prod(w.dims) for w in weights)  # one byte each
    biases = [inits[n.input[2]] for n in q.graph.node if n.op_type in ("Conv", "Gemm")]
    assert biases and all(b.data_type == TensorProto.FLOAT for b in biases)  # biases stay float
    assert not [t for t in q.graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.INT32)]
    x = np.load(calib)["x"][:6]
    got = session(q).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ReferenceEvaluator(q).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert _cosine(got, session(onnx.load(path)).run(None, {"x": x})[0]) > 0.995


def test_fp8_weights_are_the_core_formats_codes_at_amax_over_448(tmp_path):
    _, _, q = _build(tmp_path, edit(preset("fp8"), rounding=None, bias_correction=False))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    w = numpy_helper.to_array(next(t for t in models.convnet().graph.initializer if t.name == "w2"))
    scale = inits["w2_scale"]
    np.testing.assert_allclose(scale, np.abs(w).reshape(8, -1).max(1) / 448, rtol=1e-6)
    codes = inits["w2_quantized"].view(np.uint8)
    spec = QuantSpec(format="fp8_e4m3", axis=0)
    np.testing.assert_array_equal(dequantize(codes, scale, 0, spec), inits["w2_quantized"].astype(np.float32)
                                  * scale.reshape(8, 1, 1, 1))  # fmt: skip


def test_ort_sessions_on_fp8_models_run_unoptimized_and_others_at_all(tmp_path):
    _, _, q = _build(tmp_path, "fp8")
    off, every = ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert fp8.uses_fp8(q) and session_options(q).graph_optimization_level == off
    assert not fp8.uses_fp8(models.convnet()) and session_options(models.convnet()).graph_optimization_level == every
    path = tmp_path / "q.onnx"  # a session opened from a file reads the same options
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(session(path).run(None, {"x": x})[0], session(q).run(None, {"x": x})[0])


@pytest.mark.parametrize("method", ["minmax", "mse", "percentile", "entropy"])
def test_each_calibration_method_gives_fp8_scales(tmp_path, method):
    _, calib, q = _build(tmp_path, preset("fp8").with_method(method))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    amax = float(np.abs(np.load(calib)["x"]).max())
    x_scale = float(inits["x_scale"])
    assert 0 < x_scale <= amax / 448 * (1 + 1e-6)  # a range within the data's, over E4M3's max
    if method == "minmax":
        assert x_scale == pytest.approx(amax / 448, rel=1e-5)
    if method == "percentile":  # 99.99% of the values: below the largest
        assert x_scale < 0.99 * amax / 448


def test_mse_searches_the_fp8_grid_not_the_int8_one():
    """FP8's relative precision makes clipping an outlier cost more than it buys: MSE on the FP8 grid keeps a
    range an int8 grid would cut."""
    x = np.append(np.random.default_rng(0).standard_normal(100_000), 40.0).astype(np.float32)
    amax = {}
    for fmt in ("int", "fp8_e4m3"):
        spec = Settings.of(preset("fp8" if fmt != "int" else "int8_trt")).activation
        cal = calib.create("mse", **calib.grid_options("mse", spec))
        cal.update(x)
        amax[fmt] = cal.compute().hi
    assert amax["int"] < 30 < 39 < amax["fp8_e4m3"] <= 40


def test_pow2_scales_with_fp8(tmp_path):
    _, _, q = _build(tmp_path, edit(preset("fp8"), scale="pow2"))
    scales = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_scale")]
    assert len(scales) >= 6 and all(np.all(np.frexp(s)[0] == 0.5) for s in scales)


def test_bias_correction_moves_fp8_biases_and_can_be_turned_off(tmp_path):
    _, _, on = _build(tmp_path, "fp8", name="on.onnx")
    _, _, off = _build(tmp_path, edit(preset("fp8"), bias_correction=False), name="off.onnx")
    biases = lambda m: [n.input[2] for n in m.graph.node if n.op_type in ("Conv", "Gemm")]  # noqa: E731
    assert len(biases(on)) == 3 and all(b.endswith("_corrected") for b in biases(on))
    assert len(biases(off)) == 3 and not any(b.endswith("_corrected") for b in biases(off))


def test_cli_format_flag(tmp_path, capsys):
    path = models.save(models.convnet(), tmp_path / "m.onnx")
    calib = models.calib_data(tmp_path / "c.npz", (3, 16, 16))
    for fmt, wanted in (("fp8_e5m2", TensorProto.FLOAT8E5M2), ("int8", TensorProto.INT8)):
        out = tmp_path / f"{fmt}.onnx"
        assert main(["quantize", path, "-o", str(out), "--calib", calib, "--format", fmt, "--no-compare", "-q"]) == 0
        zero_points = {t.data_type for t in onnx.load(str(out)).graph.initializer if t.name.endswith("zero_point")}
        assert wanted in zero_points and (wanted == TensorProto.INT8) == (TensorProto.FLOAT8E5M2 not in zero_points)
    printed = capsys.readouterr().out
    assert printed.count("ORT_DISABLE_ALL") == 1  # the FP8 run tells users how to run it; the int8 one does not


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: edit(preset("fp8"), target="ort"), r"--format fp8_e4m3 --target ort: .* no FP8 kernels"),
        (lambda: edit(preset("fp8"), rounding="gptq"), r"rounding 'gptq' \(--rounding\) chooses integer"),
        (lambda: edit(preset("fp8"), rounding="stochastic"), r"rounding 'stochastic' \(--rounding\)"),
        (lambda: edit(preset("fp8"), refine="easyquant"), r"refine 'easyquant' \(--refine\) searches integer"),
        (lambda: edit(preset("int8"), format="fp8", dynamic=True), r"--format fp8 needs static quantization"),
        (lambda: edit(preset("int8"), format="fp4"), r"unknown format 'fp4' \(--format\)"),
    ],
)
def test_what_fp8_does_not_do_is_a_one_line_error(make, message):
    with pytest.raises(QuantizeError, match=message) as info:
        Settings.of(make())
    assert "\n" not in str(info.value)


def test_one_format_for_activations_and_weights():
    layer = preset("fp8").default
    mixed = replace(preset("fp8"), default=replace(layer, weight=preset("int8").default.weight))
    with pytest.raises(QuantizeError, match="one number format for the whole model"):
        Settings.of(mixed)


def test_fp8_defaults_to_trt_and_nearest_rounding():
    s = Settings.of(edit(preset("int8"), format="fp8"))
    assert (s.target.name, s.rounding, s.format) == ("trt", "nearest", "fp8_e4m3")
    assert Settings.of(preset("int8")).rounding == "gptq"


def test_trt_cache_with_fp8_is_refused(tmp_path):
    path = models.save(models.convnet(), tmp_path / "m.onnx")
    calib = models.calib_data(tmp_path / "c.npz", (3, 16, 16))
    with pytest.raises(QuantizeError, match=r"--trt-cache writes INT8 scales"):
        quantize(path, tmp_path / "q.onnx", calib, "fp8", options=Options(trt_cache=tmp_path / "q.cache"))
    assert not (tmp_path / "q.onnx").exists()


def test_an_opset_that_cannot_be_raised_is_a_one_line_error(tmp_path, monkeypatch):
    def refuse(model, version):
        raise RuntimeError("no adapter for op Foo\nmore lines")

    monkeypatch.setattr(fp8.version_converter, "convert_version", refuse)
    with pytest.raises(FormatError, match=r"--format fp8_e4m3: FLOAT8 Q/DQ need opset 19.*\(no adapter for op Foo\)"):
        _build(tmp_path, "fp8")


def test_an_fp8_model_at_opset_19_is_not_converted(tmp_path, monkeypatch):
    model = onnx.version_converter.convert_version(models.convnet(), 19)
    monkeypatch.setattr(fp8.version_converter, "convert_version", None)  # would fail if called
    _, _, q = _build(tmp_path, "fp8", model=model)
    assert fp8.uses_fp8(q)


def test_mixed_precision_search_runs_on_fp8(tmp_path):
    path = models.save(models.convnet(), tmp_path / "m.onnx")
    calib = models.calib_data(tmp_path / "c.npz", (3, 16, 16))
    feeds = [{"x": np.load(calib)["x"][i : i + 8]} for i in range(0, 16, 8)]
    budget = Budget(OutputMetric("relerr", feeds), 0.0)  # nothing but FP32 meets it
    result = quantize(path, tmp_path / "q.onnx", calib, "fp8", budget=budget, options=QUIET)
    assert result.mixed is not None and result.mixed.kept  # layers kept in float, fewest first
    loose = Budget(OutputMetric("relerr", feeds), 1.0)  # the whole FP8 model meets it
    result = quantize(path, tmp_path / "q2.onnx", calib, "fp8", budget=loose, options=QUIET)
    assert not result.mixed.kept and fp8.uses_fp8(onnx.load(str(tmp_path / "q2.onnx")))


def test_analyze_measures_the_fp8_build(tmp_path):
    from lowbit.onnx.analyze import Reporting, analyze

    path = models.save(models.convnet(), tmp_path / "m.onnx")
    calib = models.calib_data(tmp_path / "c.npz", (3, 16, 16))
    kinds = {}
    for name in ("fp8", "int8_trt"):
        a = analyze(path, calib, name, options=Options(progress=False), report=Reporting(samples=16, profile=False))
        assert {r.name for r in a.layers} >= {"conv1", "conv2", "fc"} and a.output_error.sqnr_db > 20
        kinds[name] = {w.layer: w.per_tensor_sqnr_db for w in a.weights}
    # the weights' SQNR is FP8's (~31 dB whatever the range), not int8's
    assert kinds["fp8"].keys() == kinds["int8_trt"].keys() and kinds["fp8"] != kinds["int8_trt"]
    assert all(25 < v < 40 for v in kinds["fp8"].values())
