"""Decomposed activations: recognised by what they compute and rewritten as one op; on the ort target lowered to
integer kernels (an Add whose quantizer clips, a Mul, a scale folded into a DequantizeLinear)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.onnx import Options, activations, quantize
from lowbit.onnx.graph import Graph
from lowbit.onnx.pointwise import regions
from lowbit.onnx.rewrite import without_dead_quantizers
from lowbit.onnx.rules import scalar_factor
from tests.onnx import models

QUIET = Options(compare=False, progress=False)
CONSTANTS = {"three": 3.0, "zero": 0.0, "six": 6.0, "sixth": 1 / 6, "half": 0.5, "one": 1.0, "root2": 2**0.5,
             "fifth": 0.2, "two": 2.0}  # fmt: skip


def _node(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output], **attrs)


# Spellings of one activation of "c" (a Conv's output) ending in "act"
HARD_SWISH = {
    "paddle": [_node("Add", ["c", "three"], "a"), _node("Clip", ["a", "zero", "six"], "k"),
               _node("Mul", ["c", "k"], "m"), _node("Div", ["m", "six"], "act")],
    "torch": [_node("Add", ["three", "c"], "a"), _node("Clip", ["a", "zero", "six"], "k"),
              _node("Div", ["k", "six"], "h"), _node("Mul", ["h", "c"], "act")],
    "hard-sigmoid": [_node("HardSigmoid", ["c"], "h", alpha=1 / 6, beta=0.5), _node("Mul", ["c", "h"], "act")],
    "relu6": [_node("Add", ["c", "three"], "a"), _node("Relu", ["a"], "r"), _node("Min", ["r", "six"], "k"),
              _node("Mul", ["k", "sixth"], "h"), _node("Mul", ["c", "h"], "act")],
}  # fmt: skip
HARD_SIGMOID = {
    "divided": [_node("Add", ["c", "three"], "a"), _node("Clip", ["a", "zero", "six"], "k"),
                _node("Div", ["k", "six"], "act")],
    "sloped": [_node("Mul", ["c", "fifth"], "a"), _node("Add", ["a", "half"], "b"),
               _node("Clip", ["b", "zero", "one"], "act")],
}  # fmt: skip
GELU = [_node("Div", ["c", "root2"], "a"), _node("Erf", ["a"], "e"), _node("Add", ["e", "one"], "b"),
        _node("Mul", ["c", "b"], "m"), _node("Mul", ["m", "half"], "act")]  # fmt: skip


def _net(chain, opset=17, tail=True, seed=0, output="act"):
    """x (N,3,8,8) -> Conv -> chain -> [Conv] -> y (without the Conv: the chain's ``output``)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2")]  # fmt: skip
    inits += [numpy_helper.from_array(np.float32(v), k) for k, v in CONSTANTS.items()]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], "conv1", pads=[1, 1, 1, 1]), *chain]
    nodes += [helper.make_node("Conv", ["act", "w2"], ["y"], "conv2")] if tail else []
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y" if tail else output, TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _run(model, x):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


X = np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)  # like the calibration data


def _fused(model):
    before = _run(model, X)
    counts = activations.fuse(model)
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(_run(model, X), before, rtol=1e-5, atol=1e-5)
    return counts, [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("spelling", sorted(HARD_SWISH))
def test_every_spelling_of_hard_swish_becomes_one_op_that_computes_the_same(spelling):
    counts, ops = _fused(_net(HARD_SWISH[spelling]))
    assert counts == {"HardSwish": 1}
    assert ops == ["Conv", "HardSwish", "Conv"]


@pytest.mark.parametrize("spelling", sorted(HARD_SIGMOID))
def test_hard_sigmoid_spellings_keep_their_slope_and_offset(spelling):
    model = _net(HARD_SIGMOID[spelling])
    counts, ops = _fused(model)
    assert counts == {"HardSigmoid": 1} and ops == ["Conv", "HardSigmoid", "Conv"]
    node = model.graph.node[1]
    attrs = {a.name: a.f for a in node.attribute}
    expected = (1 / 6, 0.5) if spelling == "divided" else (0.2, 0.5)
    assert attrs["alpha"] == pytest.approx(expected[0], rel=1e-4) and attrs["beta"] == pytest.approx(expected[1])
    assert node.name == "" or node.output[0] == "act"


def test_gelu_becomes_gelu_where_the_opset_has_it_and_stays_below():
    assert _fused(_net(GELU, opset=20))[0] == {"Gelu": 1}
    assert _fused(_net(GELU, opset=17))[0] == {}


def test_a_chain_that_computes_no_registered_activation_is_left_alone():
    near_miss = [_node("Add", ["c", "two"], "a"), _node("Clip", ["a", "zero", "six"], "k"),
                 _node("Mul", ["c", "k"], "m"), _node("Div", ["m", "six"], "act")]  # fmt: skip
    counts, ops = _fused(_net(near_miss))
    assert counts == {} and ops == ["Conv", "Add", "Clip", "Mul", "Div", "Conv"]


def test_a_chain_whose_middle_is_read_elsewhere_is_not_one_function():
    chain = HARD_SWISH["paddle"] + [_node("Add", ["k", "act"], "both")]
    model = _net(chain, tail=False, output="both")
    counts, _ = _fused(model)
    assert "HardSwish" not in counts


def test_two_activations_in_a_row_become_two_ops():
    gelu_of_act = [_node("Div", ["act", "root2"], "a2"), _node("Erf", ["a2"], "e2"), _node("Add", ["e2", "one"], "b2"),
                   _node("Mul", ["act", "b2"], "m2"), _node("Mul", ["m2", "half"], "out")]  # fmt: skip
    model = _net([*HARD_SWISH["paddle"], *gelu_of_act], opset=20, tail=False, output="out")
    counts, ops = _fused(model)
    assert counts == {"HardSwish": 1, "Gelu": 1} and ops == ["Conv", "HardSwish", "Gelu"]


def test_regions_find_functions_of_one_tensor():
    found = regions(Graph(_net(HARD_SWISH["paddle"])))
    assert [(r.source, r.result, len(r.nodes)) for r in found] == [("c", "act", 4)]
    values = np.linspace(-5, 5, 11, dtype=np.float32)
    np.testing.assert_allclose(found[0].evaluate(values), values * np.clip(values + 3, 0, 6) / 6, atol=1e-6)


def test_scalar_factor_is_a_positive_one_element_constant():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(v), k) for k, v in {"c2": 2.0, "neg": -2.0}.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "vec"))
    nodes = [_node("Mul", ["x", "c2"], "a"), _node("Div", ["x", "c2"], "b"), _node("Mul", ["c2", "x"], "c"),
             _node("Mul", ["x", "neg"], "d"), _node("Mul", ["x", "vec"], "e"),
             _node("Mul", ["x", "x"], "f")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in "abcdef"], inits,
    )  # fmt: skip
    g = Graph(helper.make_model(graph))
    assert [scalar_factor(g, n) for n in nodes] == [2.0, 0.5, 2.0, None, None, None]


def _quantized_kernels(path) -> list[str]:
    """The op types ONNX Runtime runs for a written model after its own optimizations (QDQ fusion)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path) + ".opt.onnx"
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(path) + ".opt.onnx").graph.node]


@pytest.mark.parametrize("spelling", ["paddle", "torch"])
def test_on_the_ort_target_hard_swish_runs_as_integer_kernels_only(tmp_path, spelling):
    src = models.save(_net(HARD_SWISH[spelling]), tmp_path / "net.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 8, 8), n=64)
    result = quantize(src, tmp_path / "q.onnx", data, "int8", options=QUIET)
    assert result.fused == {"HardSwish": 1}
    kernels = _quantized_kernels(tmp_path / "q.onnx")
    assert kernels.count("QLinearConv") == 2 and "QLinearAdd" in kernels and "QLinearMul" in kernels
    float_ops = {"Add", "Mul", "Div", "Clip", "HardSwish", "HardSigmoid", "Relu"}
    assert not float_ops & set(kernels), kernels
    ref, out = _run(src, X), _run(str(tmp_path / "q.onnx"), X)
    cosine = (ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out)
    assert cosine > 0.995


def test_squeeze_excite_hard_sigmoid_and_the_scale_fold_on_the_ort_target(tmp_path):
    """Conv -> 1x1 Conv -> hard-sigmoid (its Div by 6 folded into a DequantizeLinear scale) -> Mul by the first
    Conv's output, as in a squeeze-excite block."""
    chain = [helper.make_node("Conv", ["c", "w_se"], ["s"], "conv_se"), _node("Add", ["s", "three"], "a"),
             _node("Clip", ["a", "zero", "six"], "k"), _node("Div", ["k", "six"], "gate"),
             _node("Mul", ["c", "gate"], "act")]  # fmt: skip
    model = _net(chain)
    w_se = np.random.default_rng(3).standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3
    model.graph.initializer.append(numpy_helper.from_array(w_se, "w_se"))
    src = models.save(model, tmp_path / "net.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 8, 8), n=64)
    result = quantize(src, tmp_path / "q.onnx", data, "int8", options=QUIET)
    assert result.fused == {"HardSigmoid": 1}
    written = onnx.load(str(tmp_path / "q.onnx"))
    assert "Div" not in [n.op_type for n in written.graph.node]
    folded = next(n for n in written.graph.node if n.output[0] == "gate")
    assert folded.op_type == "DequantizeLinear"
    scales = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    clipped = next(n for n in written.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == folded.input[0])
    assert scales[folded.input[1]] == pytest.approx(scales[clipped.input[1]] / 6)
    assert not {"Add", "Mul", "Div", "Clip", "HardSigmoid"} & set(_quantized_kernels(tmp_path / "q.onnx"))
    ref, out = _run(src, X), _run(str(tmp_path / "q.onnx"), X)
    assert (ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out) > 0.995


def test_the_trt_target_keeps_the_single_op(tmp_path):
    src = models.save(_net(HARD_SWISH["paddle"]), tmp_path / "net.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 8, 8), n=32)
    quantize(src, tmp_path / "q.onnx", data, "int8_trt", options=QUIET)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert "HardSwish" in ops and "Clip" not in ops


def test_dead_quantizers_are_removed_and_live_ones_kept():
    nodes = [_node("QuantizeLinear", ["x", "s", "z"], "q"), _node("DequantizeLinear", ["q", "s", "z"], "dq"),
             _node("DequantizeLinear", ["q", "s", "z"], "used"), _node("QuantizeLinear", ["x", "s", "z"], "q2"),
             _node("DequantizeLinear", ["q2", "s", "z"], "dead"), _node("Relu", ["used"], "y")]  # fmt: skip
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)  # fmt: skip
    model = helper.make_model(graph)
    assert without_dead_quantizers(model) == 3
    assert [n.output[0] for n in model.graph.node] == ["q", "used", "y"]


def test_an_affine_block_with_the_constant_first_around_hard_swish_stays_integer(tmp_path):
    """PP-OCRv4's learnable affine blocks: Conv -> Mul(scale, x) -> Add(x, bias) -> hard-swish -> Mul(scale, x)
    -> Add(x, bias) -> Conv, every constant a one-element tensor, the Mul's first."""
    inits = [numpy_helper.from_array(np.array([v], np.float32), k) for k, v in
             {"s1": 1.2, "b1": 0.1, "s2": 0.9, "b2": -0.2}.items()]  # fmt: skip
    chain = [_node("Mul", ["s1", "c"], "m1"), _node("Add", ["m1", "b1"], "a1"),
             *[_node(n.op_type, ["a1" if i == "c" else i for i in n.input],
                     "h" if n.output[0] == "act" else n.output[0]) for n in HARD_SWISH["paddle"]],
             _node("Mul", ["s2", "h"], "m2"), _node("Add", ["m2", "b2"], "act")]  # fmt: skip
    model = _net(chain)
    model.graph.initializer.extend(inits)
    src = models.save(onnx.shape_inference.infer_shapes(model), tmp_path / "net.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 8, 8), n=64)
    quantize(src, tmp_path / "q.onnx", data, "int8", options=QUIET)
    kernels = _quantized_kernels(tmp_path / "q.onnx")
    assert not {"Add", "Mul", "Div", "Clip"} & set(kernels), kernels
    ref, out = _run(src, X), _run(str(tmp_path / "q.onnx"), X)
    assert (ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out) > 0.995


def test_below_opset_14_hard_swish_is_recognised_only_where_it_is_lowered(tmp_path):
    src = models.save(_net(HARD_SWISH["paddle"], opset=13), tmp_path / "net.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 8, 8), n=32)
    assert quantize(src, tmp_path / "q.onnx", data, "int8", options=QUIET).fused == {"HardSwish": 1}
    assert "HardSwish" not in [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert quantize(src, tmp_path / "t.onnx", data, "int8_trt", options=QUIET).fused == {}  # no HardSwish at 13
