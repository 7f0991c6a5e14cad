"""``lowbit.onnx.pipeline`` and ``lowbit quantize`` end to end on small models built in code."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lowbit.cli import main
from lowbit.data import DataError
from lowbit.errors import FormatError
from lowbit.onnx import Options
from lowbit.onnx.pipeline import QuantizeError, quantize
from lowbit.onnx.settings import edit
from lowbit.paths import PathError
from lowbit.recipe import preset
from lowbit.trt_cache import read_trt_cache
from tests.onnx import models


@pytest.fixture
def convnet_files(tmp_path):
    model = models.save(models.convnet(), tmp_path / "convnet.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 16, 16))
    return tmp_path, model, data


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_static_quantization_keeps_the_outputs(convnet_files, target):
    tmp, model, data = convnet_files
    out = tmp / f"q_{target}.onnx"
    result = quantize(model, out, data, edit(preset("int8"), target=target), options=Options(progress=False))
    q = onnx.load(str(out))
    onnx.checker.check_model(q)
    assert [i.name for i in q.graph.input] == ["x"] and [o.name for o in q.graph.output] == ["logits"]
    x = np.random.default_rng(5).standard_normal((6, 3, 16, 16)).astype(np.float32)
    assert _cos(_run(model, x)[0], _run(out, x)[0]) > 0.99
    assert result.agreement is not None and result.agreement.samples == 9  # 48 // 5 held out
    assert result.agreement.cosine > 0.99
    assert result.calibration_samples == 39
    assert set(result.latency) == {"fp32", "int8"} and result.latency["int8"][8] > 0
    assert "INT8 / FP32" in result.table()


def test_ranges_json_matches_the_quantizers_in_the_model(convnet_files):
    tmp, model, data = convnet_files
    out = tmp / "q.onnx"
    result = quantize(model, out, data, "int8", options=Options(compare=False, progress=False))
    record = json.loads(result.ranges_path.read_text())
    assert result.ranges_path == tmp / "q.ranges.json"
    q = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    q_nodes = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == len(record["activations"])
    scales = sorted(float(inits[n.input[1]]) for n in q_nodes)
    assert scales == sorted(np.float32(a["scale"]) for a in record["activations"].values())
    assert record["method"] == "mse" and record["target"] == "ort"


def test_trt_cache_agrees_with_the_qdq_scales(convnet_files):
    tmp, model, data = convnet_files
    out, cache = tmp / "q.onnx", tmp / "q.cache"
    quantize(
        model,
        out,
        data,
        edit(preset("int8"), target="trt"),
        options=Options(trt_cache=cache, compare=False, progress=False),
    )
    scales = read_trt_cache(cache).scales
    record = json.loads((tmp / "q.ranges.json").read_text())["activations"]
    for tensor, entry in record.items():
        assert scales[tensor] == pytest.approx(entry["scale"], rel=1e-6)
    assert len(scales) > len(record)  # implicit INT8 wants every activation, not only the Q/DQ ones


def test_excluded_nodes_stay_float(convnet_files):
    tmp, model, data = convnet_files
    result = quantize(
        model,
        tmp / "q.onnx",
        data,
        edit(preset("int8"), exclude=["^conv2$"], exclude_ops=["Gemm"]),
        options=Options(progress=False, compare=False),
    )
    assert "conv2" in result.excluded_nodes and "fc" in result.excluded_nodes
    q = onnx.load(str(tmp / "q.onnx"))
    ops = collections.Counter(n.op_type for n in q.graph.node)
    assert ops["Gemm"] == 1 and "fc_w" in {t.name for t in q.graph.initializer}


def test_control_flow_is_quantized_outside_the_subgraphs(tmp_path):
    model = models.save(models.branching(), tmp_path / "if.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 8, 8), n=16)
    out = tmp_path / "if_q.onnx"
    quantize(model, out, data, "int8", options=Options(compare=False, progress=False))
    q = onnx.load(str(out))
    assert any(n.op_type == "If" for n in q.graph.node)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for sign in (1, -1):
        xs = np.abs(x) * sign
        assert _cos(_run(model, xs)[0], _run(out, xs)[0]) > 0.99


def test_refuses_to_overwrite_the_input(convnet_files):
    tmp, model, data = convnet_files
    before = (tmp / "convnet.onnx").read_bytes()
    with pytest.raises(PathError, match=r"output .* is the same file as model .*: writing it would overwrite it"):
        quantize(model, model, data, "int8", options=Options(progress=False))
    assert (tmp / "convnet.onnx").read_bytes() == before


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(FormatError, match=r"not a readable ONNX model|not an ONNX model"):
        quantize(bad, tmp_path / "out.onnx", None, edit(preset("int8"), dynamic=True), options=Options(progress=False))
    assert not (tmp_path / "out.onnx").exists()


def test_a_model_onnx_runtime_cannot_load(tmp_path):
    model = models.convnet()
    model.graph.node[0].op_type = "NoSuchOp"
    path = models.save(model, tmp_path / "broken.onnx")
    with pytest.raises(FormatError, match=r"ONNX Runtime .* cannot load the model"):
        quantize(path, tmp_path / "out.onnx", None, edit(preset("int8"), dynamic=True), options=Options(progress=False))


def test_calibration_data_that_does_not_fit_lists_what_the_model_expects(convnet_files):
    tmp, model, _ = convnet_files
    wrong_rank = models.calib_data(tmp / "rank.npz", (3, 16), n=4)
    with pytest.raises(DataError, match=r"x: float32\[\?, 3, 16, 16\]"):
        quantize(model, tmp / "q.onnx", wrong_rank, "int8", options=Options(progress=False))
    np.savez(tmp / "dtype.npz", x=np.zeros((4, 3, 16, 16)))
    with pytest.raises(DataError, match="is float64 but the model expects float32"):
        quantize(model, tmp / "q.onnx", tmp / "dtype.npz", "int8", options=Options(progress=False))
    np.savez(tmp / "names.npz", a=np.zeros((4, 3, 16, 16), np.float32), b=np.zeros((4, 1), np.float32))
    with pytest.raises(DataError, match="the model's inputs are x"):
        quantize(model, tmp / "q.onnx", tmp / "names.npz", "int8", options=Options(progress=False))


def test_nothing_to_quantize(tmp_path, convnet_files):
    tmp, model, data = convnet_files
    with pytest.raises(QuantizeError, match="nothing to quantize"):
        quantize(model, tmp / "q.onnx", data, edit(preset("int8"), exclude=[".*"]), options=Options(progress=False))


def test_cli_quantize_prints_the_comparison(convnet_files, capsys):
    tmp, model, data = convnet_files
    code = main(["quantize", str(model), "-o", str(tmp / "cli.onnx"), "--calib", str(data), "-q",
                 "--method", "percentile", "--option", "percentile=99.9"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "static, percentile calibration" in out and "FP32" in out and "top-1 agreement" in out
    assert (tmp / "cli.onnx").exists() and (tmp / "cli.ranges.json").exists()


def test_cli_quantize_errors_exit_2(convnet_files, capsys):
    tmp, model, data = convnet_files
    assert main(["quantize", str(model), "-o", str(tmp / "q.onnx")]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert main(["quantize", str(model), "-o", str(tmp / "q.onnx"), "--calib", str(data), "--dynamic"]) == 2
    assert "drop --calib" in capsys.readouterr().err


def test_models_over_the_protobuf_limit_travel_as_external_data(convnet_files, monkeypatch):
    """The >2 GB path, exercised by lowering the limit: preprocessing, calibration and output use external data."""
    from lowbit.onnx import model as model_module

    tmp, model, data = convnet_files
    monkeypatch.setattr(model_module, "_PROTO_LIMIT", 1000)
    out = tmp / "big_q.onnx"
    result = quantize(model, out, data, "int8", options=Options(progress=False))
    assert (tmp / "big_q.onnx.data").exists()
    assert result.agreement is not None and result.agreement.cosine > 0.99
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert _cos(_run(model, x)[0], _run(out, x)[0]) > 0.99


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_entropy_keeps_the_whole_range_of_a_model_input_with_a_spike(tmp_path, target):
    # An image normalised with a mean: most pixels are the background (one value), a few are bright. KL over |x|
    # picks the spike as its threshold, which would clip every bright pixel; the input keeps its observed range.
    rng = np.random.default_rng(3)
    x = np.full((48, 3, 16, 16), -0.8, np.float32)
    bright = rng.random(x.shape) < 0.1
    x[bright] = rng.uniform(0.0, 2.0, int(bright.sum())).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    model = models.save(models.convnet(), tmp_path / "convnet.onnx")
    out = tmp_path / "q.onnx"
    quantize(
        model,
        out,
        tmp_path / "calib.npz",
        edit(preset("int8"), method="entropy", target=target),
        options=Options(compare=False, progress=False),
    )
    record = json.loads((tmp_path / "q.ranges.json").read_text())
    assert record["activations"]["x"]["hi"] >= float(x.max()) * 0.999
    assert record["activations"]["x"]["lo"] <= -0.8 * 0.999
    # the tensors the model computes still get entropy's threshold (the method is only overridden for inputs)
    from lowbit.onnx.collect import collect

    cals = collect(onnx.load(model), ["x", "r1"], [{"x": x}], method="entropy", progress=False)
    assert cals["x"].method == "minmax" and cals["r1"].method == "entropy"
    assert _cos(_run(model, x[:8])[0], _run(out, x[:8])[0]) > 0.99


@pytest.mark.parametrize("rounding", ["gptq", "nearest"])
def test_a_dead_channel_keeps_its_large_bias(tmp_path, rounding):
    """A channel whose weights are all but zero and whose bias is large (BatchNorm folded into a dead channel)
    would need a bias code beyond int32 at input scale x weight scale. ONNX Runtime's fused kernels saturate
    such a bias (it ran -7 as -0.02); lowbit raises that channel's weight scale so that the bias fits."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    w[1] *= 1e-7
    b = np.array([0.1, -7.0, 0.2, 3.0], np.float32)
    model, _ = models.single_layer("Conv", w, (None, 3, 12, 12), pads=[1, 1, 1, 1])
    model.graph.initializer.append(numpy_helper.from_array(b, "b"))
    model.graph.node[0].input.append("b")
    path = models.save(model, tmp_path / "dead.onnx")
    x = rng.standard_normal((64, 3, 12, 12)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    out = tmp_path / "q.onnx"
    quantize(
        path,
        out,
        str(tmp_path / "calib.npy"),
        edit(preset("int8"), rounding=rounding),
        options=Options(compare=False, progress=False),
    )
    y, y_q = _run(path, x[:8])[0], _run(out, x[:8])[0]
    assert np.abs(y_q[:, 1] - y[:, 1]).max() < 0.1  # without the raised scale: about 7
    assert np.abs(y_q - y).max() < 0.5
    q = onnx.load(str(out))
    int32 = [i for i in q.graph.initializer if i.data_type == onnx.TensorProto.INT32]
    (bias_codes,) = [numpy_helper.to_array(i) for i in int32 if i.name.endswith("_quantized")]
    assert bias_codes.dtype == np.int32 and np.abs(bias_codes).max() <= 2**30


def test_static_quantization_of_a_transformer_block_keeps_its_output(tmp_path):
    """An additive -10000 attention mask must not set the range of the scores: the block keeps cosine > 0.99
    with FP32 (quantizing the mask Add, the residual Adds and the GELU pieces, as lowbit did before, gave 0.77)."""
    model = models.save(models.attention_block(), tmp_path / "attention.onnx")
    calib, held_out = models.attention_feeds(seed=1), models.attention_feeds(seed=2)
    np.savez(tmp_path / "calib.npz", **calib)
    quantize(model, tmp_path / "q.onnx", tmp_path / "calib.npz", "int8", options=Options(compare=False, progress=False))
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, held_out)[0]
    out = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, held_out)[0]
    assert _cos(ref, out) > 0.99
