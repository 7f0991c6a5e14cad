"""``lowbit.onnx.pipeline`` and ``lowbit quantize`` end to end on small models built in code."""

from __future__ import annotations

import collections
import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lowbit.cli import main
from lowbit.data import DataError
from lowbit.errors import FormatError
from lowbit.onnx.pipeline import QuantizeError, quantize
from lowbit.paths import PathError
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
    result = quantize(model, out, data, target=target, progress=False)
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
    result = quantize(model, out, data, compare_models=False, progress=False)
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
    quantize(model, out, data, target="trt", trt_cache=cache, compare_models=False, progress=False)
    scales = read_trt_cache(cache).scales
    record = json.loads((tmp / "q.ranges.json").read_text())["activations"]
    for tensor, entry in record.items():
        assert scales[tensor] == pytest.approx(entry["scale"], rel=1e-6)
    assert len(scales) > len(record)  # implicit INT8 wants every activation, not only the Q/DQ ones


def test_excluded_nodes_stay_float(convnet_files):
    tmp, model, data = convnet_files
    result = quantize(model, tmp / "q.onnx", data, exclude=["^conv2$"], exclude_ops=["Gemm"], progress=False,
                      compare_models=False)  # fmt: skip
    assert "conv2" in result.excluded_nodes and "fc" in result.excluded_nodes
    q = onnx.load(str(tmp / "q.onnx"))
    ops = collections.Counter(n.op_type for n in q.graph.node)
    assert ops["Gemm"] == 1 and "fc_w" in {t.name for t in q.graph.initializer}


def test_dynamic_quantization_of_matmul_and_gemm(tmp_path):
    model = models.save(models.mlp(), tmp_path / "mlp.onnx")
    out = tmp_path / "mlp_dyn.onnx"
    data = models.calib_data(tmp_path / "eval.npz", (4, 16), n=16)
    result = quantize(model, out, dynamic=True, eval_data=data, progress=False)
    assert sorted(result.quantized_nodes) == ["head", "mm1", "mm2"]
    q = onnx.load(str(out))
    ops = collections.Counter(n.op_type for n in q.graph.node)
    assert ops["MatMulInteger"] == 3 and ops["DynamicQuantizeLinear"] == 3 and ops["MatMul"] == 0
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    fused = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert fused["DynamicQuantizeMatMul"] >= 2 and fused["MatMulInteger"] == 0
    x = np.random.default_rng(3).standard_normal((5, 4, 16)).astype(np.float32)
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = sess.run(None, {"x": x})
    for a, b in zip(ref, got, strict=True):
        assert _cos(a, b) > 0.995
    assert result.agreement is not None and result.agreement.cosine > 0.995


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_quantization_stores_embedding_tables_as_int8(tmp_path, mode):
    rng = np.random.default_rng(4)
    table = numpy_helper.from_array((rng.standard_normal((500, 16)) * 0.1).astype(np.float32), "table")
    small = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "small")  # < 4,096 values
    w = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w")
    nodes = [
        onnx.helper.make_node("Gather", ["table", "ids"], ["emb"], "embed"),
        onnx.helper.make_node("Gather", ["small", "ids_small"], ["emb_small"], "embed_small"),
        onnx.helper.make_node("Add", ["emb", "emb_small"], ["s"], "add"),
        onnx.helper.make_node("MatMul", ["s", "w"], ["y"], "proj"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "embedding",
        [
            onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 6]),
            onnx.helper.make_tensor_value_info("ids_small", onnx.TensorProto.INT64, [6]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6, 4])],
        [table, small, w],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    src, out = tmp_path / "emb.onnx", tmp_path / "emb_dyn.onnx"
    onnx.save(model, str(src))
    if mode == "dynamic":
        result = quantize(src, out, dynamic=True, compare_models=False, progress=False)
    else:  # static leaves the gathered rows float (they feed no compute op) but stores the table as int8 too
        # ids_small has no batch axis: 6 sequences keep the first axes of both inputs the same length
        calib = [{"ids": rng.integers(0, 500, (6, 6)), "ids_small": rng.integers(0, 8, 6)} for _ in range(8)]
        result = quantize(src, out, calib, compare_models=False, progress=False)
    assert sorted(result.quantized_nodes) == ["embed", "proj"]
    q = onnx.load(str(out))
    inits = {t.name: t for t in q.graph.initializer}
    embed = next(n for n in q.graph.node if n.name == "embed")
    assert inits[embed.input[0]].data_type == onnx.TensorProto.INT8 and "table" not in inits
    assert inits["small"].data_type == onnx.TensorProto.FLOAT
    assert out.stat().st_size < 0.4 * src.stat().st_size
    feeds = {"ids": rng.integers(0, 500, (3, 6)), "ids_small": rng.integers(0, 8, 6)}
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert _cos(ref, got) > 0.995
    record = json.loads((tmp_path / "emb_dyn.ranges.json").read_text())
    assert "embed" in record["quantized_nodes"]


def test_embedding_rows_keep_their_own_scale():
    # Word tables hold rows of very different sizes (rare words are small): one scale for the whole table would
    # round the small rows to a few codes; a scale per row keeps each row's shape.
    from lowbit.onnx.dynamic import quantize_dynamic

    rng = np.random.default_rng(5)
    table = rng.standard_normal((512, 16)) * np.logspace(-2, 0, 512)[:, None]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "ids"], ["emb"], "embed")],
        "embedding",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N"])],
        [onnx.helper.make_tensor_value_info("emb", onnx.TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(table.astype(np.float32), "table")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    quantized, plan = quantize_dynamic(model, tables_only=True)
    assert plan.quantized_nodes == ["embed"]
    ids = np.arange(512)
    sess = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"ids": ids})[0]
    rows = (got * table).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(table, axis=1)
    assert rows.min() > 0.999


def test_static_quantization_for_tensorrt_leaves_embedding_tables_in_float(tmp_path):
    rng = np.random.default_rng(4)
    table = numpy_helper.from_array((rng.standard_normal((500, 16)) * 0.1).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w")
    nodes = [
        onnx.helper.make_node("Gather", ["table", "ids"], ["emb"], "embed"),
        onnx.helper.make_node("MatMul", ["emb", "w"], ["y"], "proj"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "embedding",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6, 4])],
        [table, w],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    src, out = tmp_path / "emb.onnx", tmp_path / "emb_trt.onnx"
    onnx.save(model, str(src))
    calib = [{"ids": rng.integers(0, 500, (4, 6))} for _ in range(8)]
    result = quantize(src, out, calib, target="trt", compare_models=False, progress=False)
    assert result.quantized_nodes == ["proj"]
    inits = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert inits["table"].data_type == onnx.TensorProto.FLOAT


def _recurrent_model(op: str, hidden: int, direction: str, rng) -> onnx.ModelProto:
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    dirs = 2 if direction == "bidirectional" else 1
    inits = [
        numpy_helper.from_array((rng.standard_normal((dirs, gates * hidden, 12)) * 0.3).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal((dirs, gates * hidden, hidden)) * 0.2).astype(np.float32), "R"),
        numpy_helper.from_array((rng.standard_normal((dirs, 2 * gates * hidden)) * 0.1).astype(np.float32), "B"),
    ]
    attrs = {"hidden_size": hidden, "direction": direction}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    node = onnx.helper.make_node(op, ["x", "W", "R", "B"], ["y"], "recurrent", **attrs)
    graph = onnx.helper.make_graph(
        [node],
        "recurrent",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["T", "N", 12])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize(
    ("op", "direction", "kernel"),
    [
        ("LSTM", "forward", "DynamicQuantizeLSTM"),
        ("LSTM", "bidirectional", "DynamicQuantizeLSTM"),
        ("GRU", "bidirectional", "GRU"),
        ("RNN", "reverse", "RNN"),
    ],
)
def test_dynamic_quantization_of_recurrent_layers(tmp_path, op, direction, kernel, per_channel):
    """LSTM runs as ONNX Runtime's DynamicQuantizeLSTM; with weight_only_rnn, GRU/RNN keep their node and read int8
    weights through DequantizeLinear. Either way W and R are stored as int8 and the outputs stay close to FP32."""
    rng = np.random.default_rng(5)
    src, out = tmp_path / f"{op}.onnx", tmp_path / f"{op}_dyn.onnx"
    onnx.save(_recurrent_model(op, 64, direction, rng), str(src))
    if op != "LSTM":  # no integer kernel: left in float unless asked
        with pytest.raises(QuantizeError, match="nothing to quantize"):
            quantize(src, out, dynamic=True, compare_models=False, progress=False)
    result = quantize(
        src, out, dynamic=True, weight_only_rnn=True, per_channel=per_channel, compare_models=False, progress=False
    )
    assert result.quantized_nodes == ["recurrent"]
    q = onnx.load(str(out))
    onnx.checker.check_model(q)
    (node,) = [n for n in q.graph.node if n.name == "recurrent"]
    assert node.op_type == kernel
    inits = {t.name: t for t in q.graph.initializer}
    assert "W" not in inits and "R" not in inits
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in inits.values()) >= 2
    assert out.stat().st_size < 0.4 * src.stat().st_size
    x = rng.standard_normal((7, 3, 12)).astype(np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == ref.shape
    assert _cos(ref, got) > 0.999
    # one scale per direction (per-tensor) is coarser than one per gate row
    assert np.abs(got - ref).max() < (0.05 if per_channel else 0.1) * np.abs(ref).max()


def test_an_excluded_lstm_stays_in_float(tmp_path):
    src, out = tmp_path / "lstm.onnx", tmp_path / "lstm_dyn.onnx"
    onnx.save(_recurrent_model("LSTM", 8, "forward", np.random.default_rng(6)), str(src))
    with pytest.raises(QuantizeError, match="nothing to quantize"):
        quantize(src, out, dynamic=True, exclude_ops=["LSTM"], compare_models=False, progress=False)


def test_control_flow_is_quantized_outside_the_subgraphs(tmp_path):
    model = models.save(models.branching(), tmp_path / "if.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 8, 8), n=16)
    out = tmp_path / "if_q.onnx"
    quantize(model, out, data, compare_models=False, progress=False)
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
        quantize(model, model, data, progress=False)
    assert (tmp / "convnet.onnx").read_bytes() == before


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(FormatError, match=r"not a readable ONNX model|not an ONNX model"):
        quantize(bad, tmp_path / "out.onnx", dynamic=True, progress=False)
    assert not (tmp_path / "out.onnx").exists()


def test_a_model_onnx_runtime_cannot_load(tmp_path):
    model = models.convnet()
    model.graph.node[0].op_type = "NoSuchOp"
    path = models.save(model, tmp_path / "broken.onnx")
    with pytest.raises(FormatError, match=r"ONNX Runtime .* cannot load the model"):
        quantize(path, tmp_path / "out.onnx", dynamic=True, progress=False)


def test_calibration_data_that_does_not_fit_lists_what_the_model_expects(convnet_files):
    tmp, model, _ = convnet_files
    wrong_rank = models.calib_data(tmp / "rank.npz", (3, 16), n=4)
    with pytest.raises(DataError, match=r"x: float32\[\?, 3, 16, 16\]"):
        quantize(model, tmp / "q.onnx", wrong_rank, progress=False)
    np.savez(tmp / "dtype.npz", x=np.zeros((4, 3, 16, 16)))
    with pytest.raises(DataError, match="is float64 but the model expects float32"):
        quantize(model, tmp / "q.onnx", tmp / "dtype.npz", progress=False)
    np.savez(tmp / "names.npz", a=np.zeros((4, 3, 16, 16), np.float32), b=np.zeros((4, 1), np.float32))
    with pytest.raises(DataError, match="the model's inputs are x"):
        quantize(model, tmp / "q.onnx", tmp / "names.npz", progress=False)


def test_nothing_to_quantize(tmp_path, convnet_files):
    tmp, model, data = convnet_files
    with pytest.raises(QuantizeError, match="nothing to quantize"):
        quantize(model, tmp / "q.onnx", data, exclude=[".*"], progress=False)


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
    result = quantize(model, out, data, progress=False)
    assert (tmp / "big_q.onnx.data").exists()
    assert result.agreement is not None and result.agreement.cosine > 0.99
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert _cos(_run(model, x)[0], _run(out, x)[0]) > 0.99


def test_entropy_for_onnx_leaves_zeros_out_unless_told_otherwise():
    from lowbit.onnx.calibration import calibrator_options
    from lowbit.onnx.settings import Settings
    from lowbit.recipe import preset

    def options(method, target, given=None):
        return calibrator_options(Settings.of(preset(f"int8_{target}").with_method(method, given)))

    assert options("entropy", "ort")["exclude_zeros"] is True
    assert options("entropy", "trt", {"exclude_zeros": False})["exclude_zeros"] is False
    assert "exclude_zeros" not in options("mse", "ort")


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
    quantize(model, out, tmp_path / "calib.npz", method="entropy", target=target, compare_models=False, progress=False)
    record = json.loads((tmp_path / "q.ranges.json").read_text())
    assert record["activations"]["x"]["hi"] >= float(x.max()) * 0.999
    assert record["activations"]["x"]["lo"] <= -0.8 * 0.999
    # the tensors the model computes still get entropy's threshold (the method is only overridden for inputs)
    from lowbit.onnx.collect import collect

    cals = collect(onnx.load(model), ["x", "r1"], [{"x": x}], method="entropy", progress=False)
    assert cals["x"].method == "minmax" and cals["r1"].method == "entropy"
    assert _cos(_run(model, x[:8])[0], _run(out, x[:8])[0]) > 0.99


def test_interleaved_latency_runs_every_model_in_each_round_in_rotated_order():
    from lowbit.onnx.compare import interleaved_latency_ms

    calls: list[tuple[str, float]] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, outputs, feed):
            calls.append((self.name, time.perf_counter()))

    sessions = {n: Fake(n) for n in "abc"}
    times = interleaved_latency_ms(sessions, {}, warmup=1, settle_s=0.0, runs=2, timed_s=0.0, budget_s=0.0, rounds=3)
    assert set(times) == {"a", "b", "c"} and all(t >= 0 for t in times.values())
    names = [n for n, _ in calls]
    assert names[:3] == ["a", "b", "c"]  # warm-up
    # A block per model and round: one untimed run, then the timed ones; the order rotates each round.
    assert names[3:] == [n for n in "abcbcacab" for _ in range(3)]

    calls.clear()
    interleaved_latency_ms(sessions, {}, warmup=0, settle_s=0.01, runs=1, timed_s=0.0, budget_s=0.0, rounds=2)
    blocks, i = [], 0
    while i < len(calls):  # split the calls into runs of one model
        j = i
        while j < len(calls) and calls[j][0] == calls[i][0]:
            j += 1
        blocks.append(calls[i:j])
        i = j
    assert len(blocks) == 6
    # Each model runs on its own for settle_s before its timed run: other sessions' threads have gone quiet.
    assert all(len(b) >= 2 and b[-1][1] - b[0][1] >= 0.009 for b in blocks)


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
    quantize(path, out, str(tmp_path / "calib.npy"), rounding=rounding, compare_models=False, progress=False)
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
    quantize(model, tmp_path / "q.onnx", tmp_path / "calib.npz", compare_models=False, progress=False)
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, held_out)[0]
    out = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, held_out)[0]
    assert _cos(ref, out) > 0.99
