"""Op rules as data (lowbit.onnx.rules): what each op type is, and where a layer's error is read."""

from __future__ import annotations

from onnx import helper

from lowbit.onnx.graph import Graph
from lowbit.onnx.model import preprocess
from lowbit.onnx.rules import KINDS, RULES, rule_for, unit_output
from tests.onnx import models


def test_every_rule_has_a_known_kind_and_other_domains_have_none():
    assert {r.kind for r in RULES.values()} <= set(KINDS)
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    assert rule_for(conv).kind == "compute" and rule_for(conv).weight_inputs == (1,)
    assert rule_for(helper.make_node("Conv", ["x", "w"], ["y"], domain="com.example")) is None
    assert rule_for(helper.make_node("Softmax", ["x"], ["y"])) is None


def test_a_layers_error_is_read_after_the_relu_that_follows_it():
    graph = Graph(preprocess(models.convnet()))
    conv1 = next(n for n in graph.nodes if n.op_type == "Conv")
    relu = graph.consumers[conv1.output[0]][0]
    assert relu.op_type == "Relu" and unit_output(graph, graph.node_name(conv1)) == relu.output[0]
    gemm = next(n for n in graph.nodes if n.op_type == "Gemm")
    assert unit_output(graph, graph.node_name(gemm)) == gemm.output[0]
