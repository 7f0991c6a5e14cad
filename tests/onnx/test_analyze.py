"""Sensitivity analysis, automatic mixed precision, profiling, extraction and the report, on small models."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lowbit.analysis.report import render
from lowbit.cli import main
from lowbit.errors import AnalyzeError
from lowbit.onnx import Budget, Options, kernels, metrics, mixed
from lowbit.onnx.analyze import Reporting, analyze
from lowbit.onnx.calibration import calibrate_model
from lowbit.onnx.model import preprocess
from lowbit.onnx.pipeline import quantize
from lowbit.onnx.settings import edit
from lowbit.paths import PathError
from lowbit.recipe import preset
from tests.onnx import models

PER_TENSOR = preset("int8").with_weight_granularity("tensor")


def _spoiled_convnet():
    """convnet with one output channel of conv2 50x larger than the rest: per tensor, conv2 is the weak layer."""
    m = models.convnet()
    for t in m.graph.initializer:
        if t.name == "w2":
            w = numpy_helper.to_array(t).copy()
            w[0] *= 50.0
            t.CopyFrom(numpy_helper.from_array(w, "w2"))
    return m


@pytest.fixture
def files(tmp_path):
    model = models.save(_spoiled_convnet(), tmp_path / "convnet.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 16, 16))
    return tmp_path, model, data


def _feeds(n=16, seed=3):
    x = np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)
    return [{"x": x[i : i + 8]} for i in range(0, n, 8)]


def test_the_layer_that_alone_loses_most_ranks_first(files):
    _tmp, model, data = files
    a = analyze(
        model,
        data,
        edit(preset("int8"), per_channel=False),
        options=Options(progress=False),
        report=Reporting(samples=16, profile=False),
    )
    names = [r.name for r in a.layers]
    assert sorted(names) == ["add", "conv1", "conv2", "fc", "gap"]
    assert names[0] == "conv2"
    sqnr = [r.own_model.sqnr_db for r in a.layers]
    assert sqnr == sorted(sqnr)
    conv2 = next(w for w in a.weights if w.layer == "conv2")
    assert conv2.poor and len(conv2.channel_min) == 8 and conv2.channel_max[0] > 10 * max(conv2.channel_max[1:])
    assert a.weights[0].layer == "conv2"  # worst per tensor first


def test_per_channel_weights_remove_that_loss(files):
    _tmp, model, data = files
    per_tensor = analyze(
        model,
        data,
        edit(preset("int8"), per_channel=False),
        options=Options(progress=False),
        report=Reporting(samples=16, profile=False),
    )
    per_channel = analyze(
        model,
        data,
        edit(preset("int8"), per_channel=True),
        options=Options(progress=False),
        report=Reporting(samples=16, profile=False),
    )
    conv2 = {r.name: r for r in per_tensor.layers}["conv2"].own_model.sqnr_db
    assert {r.name: r for r in per_channel.layers}["conv2"].own_model.sqnr_db > conv2 + 10


def test_json_and_report_hold_every_layer(files):
    tmp, model, data = files
    a = analyze(
        model,
        data,
        "int8",
        options=Options(progress=False),
        report=Reporting(samples=16, html=tmp / "r.html", json=tmp / "r.json"),
    )
    record = json.loads((tmp / "r.json").read_text())
    assert [r["name"] for r in record["layers"]] == [r.name for r in a.layers]
    assert record["output_error"]["sqnr_db"] == pytest.approx(a.output_error.sqnr_db)
    assert record["profile"]["kernels"]
    html = (tmp / "r.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    for r in a.layers:
        assert r.name in html
    images = html.count("<img ")
    assert images >= 3 + len(a.tensors) // 4
    for uri in _data_uris(html):  # every embedded plot is well-formed SVG
        ET.fromstring(uri)


def _data_uris(html):
    import base64
    import re

    return [base64.b64decode(m).decode() for m in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', html)]


def test_keeping_a_layer_in_float_leaves_its_weights_float(files):
    _tmp, model, _data = files
    cal = calibrate_model(preprocess(onnx.load(model)), _feeds(), every_tensor=True, progress=False)
    built = cal.build(keep_float=["conv2"])
    inits = {t.name for t in built.model.graph.initializer}
    assert "w2" in inits and "w2_quantized" not in inits and any(n.endswith("w1_quantized") for n in inits)
    assert "conv2" in built.plan.excluded_nodes
    full = cal.build()
    assert "w2_quantized" in {t.name for t in full.model.graph.initializer}


def test_mixed_precision_keeps_the_fewest_layers_that_meet_the_budget(files):
    _tmp, model, _data = files
    cal = calibrate_model(preprocess(onnx.load(model)), _feeds(), PER_TENSOR, every_tensor=True, progress=False)
    ranked = ["conv2", "conv1", "add", "gap", "fc"]
    all_quantized = metrics.OutputMetric("cosine", _feeds(seed=9))
    result = mixed.search(cal, ranked, all_quantized, max_drop=1.0, progress=False)
    assert result.met and result.kept == [] and len(result.steps) == 1

    tight = mixed.search(cal, ranked, metrics.OutputMetric("cosine", _feeds(seed=9)), max_drop=-1.0, progress=False)
    assert not tight.met and [s.kept for s in tight.steps] == [0, 1, 2, 3, 4, 5]
    assert tight.steps[-1].drop == pytest.approx(0.0, abs=1e-6)  # every layer in float is the float model
    budget = tight.steps[1].drop + 1e-9  # what keeping conv2 alone achieves
    if tight.steps[0].drop > budget:
        r = mixed.search(cal, ranked, metrics.OutputMetric("cosine", _feeds(seed=9)), budget, progress=False)
        assert r.met and r.kept == ["conv2"]
    assert "layer kept in float" in tight.table()


def test_an_agreement_budget_says_how_noisy_its_score_is(files):
    _tmp, model, _data = files
    cal = calibrate_model(preprocess(onnx.load(model)), _feeds(), PER_TENSOR, every_tensor=True, progress=False)
    metric = metrics.OutputMetric("agreement", _feeds(seed=9))
    result = mixed.search(cal, ["conv2"], metric, max_drop=20.0, progress=False)
    assert result.samples == 16  # every evaluation sample, counted once
    # 16 samples cannot tell a 20-point budget apart: the table says so and how many samples would.
    assert result.noise == pytest.approx(100 * math.sqrt(0.8 * 0.2 / 16))
    assert "16 samples" in result.table() and "Evaluate on more samples (about 64 " in result.table()
    assert result.to_dict()["noise"] == result.noise
    cosine = mixed.search(cal, ["conv2"], metrics.OutputMetric("cosine", _feeds(seed=9)), 1.0, progress=False)
    assert cosine.samples is None and cosine.noise is None and "standard error" not in cosine.table()
    labels = np.zeros(16, np.int64)  # accuracy's drop is paired on the same samples: no binomial note for it
    accuracy = mixed.search(
        cal, ["conv2"], metrics.OutputMetric("accuracy", _feeds(seed=9), labels), 100.0, progress=False
    )
    assert accuracy.samples is None and accuracy.noise is None


def test_quantize_with_a_budget_keeps_layers_float(files):
    tmp, model, data = files
    scores = iter([1.0] + [0.0] * 10)  # FP32 scores 1, every quantized model 0: a budget no model meets
    metric = metrics.FunctionMetric(lambda session: next(scores), "never")
    result = quantize(
        model,
        tmp / "q.onnx",
        data,
        edit(preset("int8"), per_channel=False),
        budget=Budget(metric, 0.5),
        options=Options(compare=False, progress=False),
    )
    assert not result.mixed.met and set(result.mixed.kept) == {"conv1", "conv2", "add", "gap", "fc"}
    assert set(result.excluded_nodes) >= {"conv1", "conv2", "add", "fc"}
    record = json.loads(result.ranges_path.read_text())
    assert set(record["excluded_nodes"]) >= {"conv2"}


def test_accuracy_metric_needs_labels_of_the_right_length():
    with pytest.raises(ValueError, match="labels"):
        metrics.OutputMetric("accuracy", _feeds())
    m = metrics.OutputMetric("accuracy", _feeds(), labels=np.zeros(5, np.int64))
    sess = ort.InferenceSession(models.convnet().SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="5 labels for 16"):
        m.prepare(sess)


def test_metric_functions_are_told_from_data_functions(tmp_path, monkeypatch):
    (tmp_path / "userfns.py").write_text("def score(session):\n    return 1.0\n\ndef data():\n    return []\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert metrics.is_metric_function("userfns:score")
    assert not metrics.is_metric_function("userfns:data")
    assert not metrics.is_metric_function(str(tmp_path))


def test_profile_tells_integer_kernels_from_float_ones(files):
    tmp, model, data = files
    quantize(model, tmp / "q.onnx", data, "int8", options=Options(compare=False, progress=False))
    feed = _feeds(8)[0]
    q = kernels.profile(str(tmp / "q.onnx"), feed, runs=2)
    kinds = {k.op: k.kind for k in q.kernels}
    assert kinds.get("QLinearConv") == "integer" and not any(k.float_matrix for k in q.kernels)
    f = kernels.profile(model, feed, runs=2)
    assert all(k.kind in ("float", "move") for k in f.kernels) and any(k.float_matrix for k in f.kernels)
    assert {k.op: k.kind for k in f.kernels}.get("Flatten") == "move"  # data movement, not arithmetic
    assert "ran in float" in f.summary() and q.batch == 8


def test_profile_parse_averages_the_last_runs():
    events = [
        {"cat": "Node", "name": "conv_token_3_kernel_time", "dur": d,
         "args": {"op_name": "QLinearConv", "input_type_shape": [{"uint8": [1]}, {"float": []}]}}
        for d in (1000, 20, 40)
    ] + [{"cat": "Session", "name": "model_run", "dur": 5}]  # fmt: skip
    p = kernels.parse(events, runs=2, batch=1)
    assert [(k.node, k.op, k.kind) for k in p.kernels] == [("conv", "QLinearConv", "integer")]
    assert p.kernels[0].ms == pytest.approx(0.03)


def test_extract_writes_runnable_cuts_with_recorded_inputs(files):
    tmp, model, data = files
    a = analyze(
        model,
        data,
        "int8",
        options=Options(progress=False),
        report=Reporting(samples=16, extract=["conv2"], extract_dir=tmp / "cut", profile=False),
    )
    paths = {p.rsplit("/", 1)[-1] for p in a.extracted}
    assert paths == {"conv2.float.onnx", "conv2.int8.onnx", "conv2.inputs.npz", "conv2.fp32_output.npy"}
    feed = dict(np.load(tmp / "cut" / "conv2.inputs.npz"))
    expected = np.load(tmp / "cut" / "conv2.fp32_output.npy")
    assert list(feed) == ["p1"] and len(expected) == 16
    outs = {}
    for kind in ("float", "int8"):
        m = onnx.load(str(tmp / "cut" / f"conv2.{kind}.onnx"))
        onnx.checker.check_model(m)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        outs[kind] = sess.run(None, feed)[0]
    np.testing.assert_allclose(outs["float"], expected, rtol=1e-5, atol=1e-5)
    assert 0 < np.abs(outs["int8"] - expected).max() < 0.2 * np.abs(expected).max()
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp / "cut" / "conv2.int8.onnx")).graph.node)


def test_bad_requests_are_clear_errors(files):
    _tmp, model, data = files
    with pytest.raises(AnalyzeError, match="no node of that name"):
        analyze(
            model,
            data,
            "int8",
            options=Options(progress=False),
            report=Reporting(samples=8, extract=["nope"], profile=False),
        )
    with pytest.raises(PathError, match=r"report .* is the same file as model"):
        analyze(model, data, "int8", options=Options(progress=False), report=Reporting(html=model))
    with pytest.raises(AnalyzeError, match="calibration data"):
        analyze(model, None, "int8", options=Options(progress=False))


def test_cli_analyze_and_inspect(files, capsys):
    tmp, model, data = files
    argv = ["analyze", model, "--calib", data, "--samples", "16", "--json", str(tmp / "a.json"),
            "--report", str(tmp / "a.html"), "--max-drop", "0.5", "-q"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "most sensitive first" in out and "mixed precision: cosine" in out and "kernels" in out
    assert json.loads((tmp / "a.json").read_text())["mixed"]["met"] is True
    assert main(["quantize", model, "--calib", data, "-o", str(tmp / "q.onnx"), "--no-compare", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp / "q.onnx"), "--batch-size", "2", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "QLinearConv" in out and "integer" in out
    assert main(["quantize", model, "--calib", data, "-o", str(tmp / "q2.onnx"), "--metric", "cosine", "-q"]) == 2
    assert "--max-drop" in capsys.readouterr().err


def test_report_renders_without_a_mixed_result_or_profile(files):
    _tmp, model, data = files
    a = analyze(model, data, "int8", options=Options(progress=False), report=Reporting(samples=8, profile=False))
    html = render(a)
    assert "Automatic mixed precision" not in html and "ONNX Runtime CPU profile" not in html
    assert html.startswith("<!DOCTYPE html>")


def test_cli_budget_with_a_metric_function(files, capsys, monkeypatch):
    tmp, model, data = files
    (tmp / "mymetric.py").write_text(
        "import numpy as np\n"
        "X = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)\n"
        "def score(session):\n"
        "    return float(session.run(None, {'x': X})[0].std())\n"
    )
    monkeypatch.chdir(tmp)
    monkeypatch.syspath_prepend(str(tmp))
    argv = ["quantize", model, "--calib", data, "-o", str(tmp / "q.onnx"), "--no-compare", "-q",
            "--max-drop", "100", "--eval", "mymetric:score"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mixed precision: mymetric:score" in out and "within budget with 0 layer(s)" in out
    argv[-4:] = ["--max-drop", "1", "--eval", "mymetric:score", "--metric", "cosine"]
    assert main(argv) == 2
    assert "drop --metric" in capsys.readouterr().err
    argv[-6:] = ["--eval", "mymetric:score"]
    assert main(argv) == 2
    assert "add --max-drop" in capsys.readouterr().err


def test_trt_layout_is_analysed_too(files):
    _, model, data = files
    a = analyze(
        model,
        data,
        edit(preset("int8"), target="trt", method="minmax"),
        options=Options(progress=False),
        report=Reporting(samples=8),
    )
    assert {"conv1", "conv2", "fc"} <= {r.name for r in a.layers}
    assert all(rep.ranges["minmax"]["lo"] == -rep.ranges["minmax"]["hi"] for rep in a.tensors.values())  # symmetric
    assert a.profile is not None and "TensorRT" in render(a)
