"""The graph index and its helpers (lowbit.onnx.graph): node attributes as Python values, subgraphs, fresh names."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from lowbit.onnx.graph import Names, attribute, attributes, subgraphs


def test_attributes_are_read_as_python_values():
    node = helper.make_node("Gemm", ["a", "b"], ["y"], transB=1, alpha=0.5)
    assert attributes(node) == {"transB": 1, "alpha": 0.5}
    assert attribute(node, "transB", 0) == 1 and attribute(node, "beta", 1.0) == 1.0


def test_subgraphs_are_the_bodies_a_node_holds():
    vi = helper.make_tensor_value_info
    branch = [helper.make_graph([], name, [], [vi("x", TensorProto.FLOAT, [1])]) for name in ("then", "else")]
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch[0], else_branch=branch[1])
    assert sorted(g.name for g in subgraphs(node)) == ["else", "then"]
    assert list(subgraphs(helper.make_node("Relu", ["x"], ["y"]))) == []


def test_fresh_names_skip_every_name_in_use():
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], "relu")],
        "g",
        [vi("x", TensorProto.FLOAT, [1])],
        [vi("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.zeros(1, np.float32), "w")],
    )
    names = Names(graph)
    assert [names.new(b) for b in ("y", "y", "relu", "w", "z")] == ["y_1", "y_2", "relu_1", "w_1", "z"]
    into = []
    assert names.initializer("x", np.ones(2, np.float32), into) == "x_1"
    assert into[0].name == "x_1" and numpy_helper.to_array(into[0]).tolist() == [1.0, 1.0]
