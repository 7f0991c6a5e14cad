"""Where Q/DQ goes for each target, counted on small graphs, and what ONNX Runtime makes of it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.onnx import placement
from lowbit.onnx.graph import Graph
from lowbit.onnx.model import preprocess
from lowbit.onnx.rewrite import insert_qdq
from tests.onnx import models


@pytest.fixture(scope="module")
def convnet():
    return preprocess(models.convnet())


def _ranges(plan, lo=-2.0, hi=2.0):
    return {t: (lo, hi) for t in plan.calibrated}


def test_ort_plan_quantizes_through_integer_ops(convnet):
    graph = Graph(convnet)
    plan = placement.plan(graph, "ort")
    relu1 = next(n for n in graph.nodes if n.op_type == "Relu")
    pool = next(n for n in graph.nodes if n.op_type == "MaxPool")
    conv1 = graph.producer[relu1.input[0]]
    assert relu1.input[0] not in plan.activations  # absorbed: the quantizer after Relu does its clipping
    assert plan.activations[relu1.output[0]] == relu1.output[0]
    assert plan.activations[pool.output[0]] == relu1.output[0]  # MaxPool keeps its input's scale
    assert "logits" not in plan.activations  # the Gemm output is a graph output: QGemm gives float
    assert plan.weights == {conv1.input[1]: 0, graph.producer["c2"].input[1]: 0, "fc_w": 0}
    assert set(plan.biases) == {conv1.input[2], "b2", "fc_b"}


def test_trt_plan_quantizes_inputs_of_compute_ops_and_the_residual_skip(convnet):
    graph = Graph(convnet)
    plan = placement.plan(graph, "trt")
    pool = next(n for n in graph.nodes if n.op_type == "MaxPool")
    flatten = next(n for n in graph.nodes if n.op_type == "Flatten")
    assert set(plan.activations) == {"x", pool.output[0], flatten.output[0]}  # conv2 reads pool too: one pair
    assert plan.biases == {} and plan.constants == set()
    quantized = insert_qdq(convnet, plan, _ranges(plan))
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    zero_points = [
        inits[n.input[2]] for n in quantized.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    ]
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)  # INT8 symmetric
    assert [o.name for o in quantized.graph.output] == ["logits"]


def test_trt_residual_add_of_two_convs_quantizes_the_earlier_branch():
    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["short"], "shortcut"),
        helper.make_node("Conv", ["x", "w1"], ["a"], "conv_a"),
        helper.make_node("Conv", ["a", "w2"], ["main"], "conv_b"),
        helper.make_node("Add", ["main", "short"], ["y"], "add"),
    ]
    vi = helper.make_tensor_value_info
    model = helper.make_model(
        helper.make_graph(
            nodes, "g", [vi("x", TensorProto.FLOAT, [1, 4, 4, 4])], [vi("y", TensorProto.FLOAT, None)], w
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model = onnx.shape_inference.infer_shapes(model)
    plan = placement.plan(Graph(model), "trt")
    assert "short" in plan.activations and "main" not in plan.activations


@pytest.mark.parametrize(
    ("op", "attrs", "w_shape", "axis"),
    [
        ("Gemm", {"transB": 1}, (5, 8), 0),
        ("Gemm", {}, (8, 5), 1),
        ("MatMul", {}, (8, 5), 1),
        ("ConvTranspose", {}, (8, 5, 2, 2), 1),
        ("ConvTranspose", {"group": 2}, (8, 3, 2, 2), None),
    ],
)
def test_weight_axis_is_the_output_channel(op, attrs, w_shape, axis):
    conv = op == "ConvTranspose"
    x_shape = [1, 8, 4, 4] if conv else [2, 8]
    w = numpy_helper.from_array(np.ones(w_shape, np.float32), "w")
    vi = helper.make_tensor_value_info
    node = helper.make_node(op, ["x", "w"], ["y"], "op", **attrs)
    model = helper.make_model(
        helper.make_graph([node], "g", [vi("x", TensorProto.FLOAT, x_shape)], [vi("y", TensorProto.FLOAT, None)], [w]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    for target in ("ort", "trt"):
        assert placement.plan(Graph(model), target).weights == {"w": axis}
        assert placement.plan(Graph(model), target, per_channel=False).weights == {"w": None}


def test_exclude_op_type(convnet):
    plan = placement.plan(Graph(convnet), "trt", exclude_ops=["Gemm"])
    assert "fc_w" not in plan.weights and plan.excluded_nodes == ["fc"]


def test_unknown_target():
    with pytest.raises(ValueError, match="targets: ort, qdq, trt"):
        placement.plan(Graph(models.convnet()), "tpu")


def test_ort_keeps_integers_only_where_they_reach_a_compute_op():
    """In a transformer block, the mask Add before Softmax, the residual Adds before LayerNormalization and the
    GELU's Erf/Add/Mul pieces stay in float; the q/k/v bias Adds, which feed the attention MatMuls, are integer."""
    graph = Graph(preprocess(models.attention_block()))
    plan = placement.plan(graph, "ort")
    for name in ("q_add", "k_add", "v_add"):
        assert name in plan.quantized_nodes
    for name in ("masked", "scaled", "residual1", "residual2", "gelu_x", "gelu_1p", "gelu_mul", "gelu", "up_add"):
        assert name not in plan.quantized_nodes, name
    for tensor in ("masked", "scaled", "scores", "res1", "res2", "erf", "erf1", "gm", "up_mm", "down_mm", "o_mm"):
        assert tensor not in plan.activations, tensor  # float: what reads it is a float op
    for tensor in ("x", "q", "kt", "probs", "v", "context", "ln1", "gelu", "q_mm"):
        assert tensor in plan.activations, tensor  # every input of a MatMul, and the MatMul -> bias Add chain
