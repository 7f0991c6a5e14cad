"""insert_qdq (lowbit.onnx.rewrite): what a plan becomes in the graph, and what ONNX Runtime makes of it."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

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


def test_ort_layout_runs_as_integer_kernels(convnet, tmp_path):
    """ONNX Runtime fuses every DQ -> op -> Q group into an integer kernel: no float Conv or Gemm is left."""
    plan = placement.plan(Graph(convnet), "ort")
    quantized = insert_qdq(convnet, plan, _ranges(plan, 0.0, 4.0))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["QGemm"] == 1
    assert ops["Conv"] == ops["Gemm"] == ops["Relu"] == 0


def test_ort_activations_are_uint8_and_weights_int8_per_channel(convnet):
    plan = placement.plan(Graph(convnet), "ort")
    quantized = insert_qdq(convnet, plan, _ranges(plan, 0.0, 4.0))
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    for node in quantized.graph.node:
        if node.op_type == "QuantizeLinear":
            assert inits[node.input[2]].dtype == np.uint8
        if node.op_type == "DequantizeLinear" and node.output[0] in plan.weights:
            assert inits[node.input[0]].dtype == np.int8
            assert inits[node.input[1]].shape == (inits[node.input[0]].shape[0],)
            assert not inits[node.input[2]].any()
        if node.op_type == "DequantizeLinear" and node.output[0] in plan.biases:
            assert inits[node.input[0]].dtype == np.int32


def test_excluded_node_reads_the_float_tensor(convnet):
    graph = Graph(convnet)
    conv2 = graph.producer["c2"]
    plan = placement.plan(graph, "ort", exclude=[f"^{conv2.name}$"])
    assert plan.excluded_nodes == [conv2.name]
    quantized = insert_qdq(convnet, plan, _ranges(plan, 0.0, 4.0))
    q_graph = Graph(quantized)
    node = next(n for n in quantized.graph.node if n.name == conv2.name)
    assert q_graph.producer[node.input[0]].op_type == "MaxPool"  # the float value, not a DequantizeLinear
    assert node.input[1] in q_graph.initializers  # its weight stays a float initializer
