"""Dynamic quantization (lowbit.onnx.dynamic): MatMul/Gemm, embedding tables, recurrent layers."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lowbit.onnx import Options
from lowbit.onnx.dynamic import quantize_dynamic
from lowbit.onnx.pipeline import QuantizeError, quantize
from lowbit.onnx.settings import edit
from lowbit.recipe import preset
from tests.onnx import models


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


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


def test_dynamic_quantization_of_matmul_and_gemm(tmp_path):
    model = models.save(models.mlp(), tmp_path / "mlp.onnx")
    out = tmp_path / "mlp_dyn.onnx"
    data = models.calib_data(tmp_path / "eval.npz", (4, 16), n=16)
    result = quantize(
        model, out, None, edit(preset("int8"), dynamic=True), eval_data=data, options=Options(progress=False)
    )
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
        result = quantize(
            src, out, None, edit(preset("int8"), dynamic=True), options=Options(compare=False, progress=False)
        )
    else:  # static leaves the gathered rows float (they feed no compute op) but stores the table as int8 too
        # ids_small has no batch axis: 6 sequences keep the first axes of both inputs the same length
        calib = [{"ids": rng.integers(0, 500, (6, 6)), "ids_small": rng.integers(0, 8, 6)} for _ in range(8)]
        result = quantize(src, out, calib, "int8", options=Options(compare=False, progress=False))
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
    result = quantize(
        src, out, calib, edit(preset("int8"), target="trt"), options=Options(compare=False, progress=False)
    )
    assert result.quantized_nodes == ["proj"]
    inits = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert inits["table"].data_type == onnx.TensorProto.FLOAT


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
            quantize(src, out, None, edit(preset("int8"), dynamic=True), options=Options(compare=False, progress=False))
    result = quantize(
        src,
        out,
        None,
        edit(preset("int8"), dynamic=True, weight_only_rnn=True, per_channel=per_channel),
        options=Options(compare=False, progress=False),
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
        quantize(
            src,
            out,
            None,
            edit(preset("int8"), dynamic=True, exclude_ops=["LSTM"]),
            options=Options(compare=False, progress=False),
        )
