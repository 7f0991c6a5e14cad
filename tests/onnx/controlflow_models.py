"""Models with their compute inside If, Loop and Scan bodies, built in code with seeded random weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def _w(rng, name, shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def if_model(seed: int = 0) -> onnx.ModelProto:
    """x (N,3,8,8), wide (bool) -> If(wide: Conv 3->8 -> Relu -> Conv 8->4 ; else: Conv 3->4 -> Relu) ->
    GlobalAveragePool -> Flatten -> y (N,4). Every weight is a main-graph initializer, as exporters write them."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "wa", (8, 3, 3, 3)), _w(rng, "ba", (8,), 0.1), _w(rng, "wb", (4, 8, 3, 3), 0.2),
             _w(rng, "wc", (4, 3, 3, 3)), _w(rng, "bc", (4,), 0.1)]  # fmt: skip
    then = helper.make_graph(
        [helper.make_node("Conv", ["x", "wa", "ba"], ["ta"], "then_conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["ta"], ["tr"], "then_relu"),
         helper.make_node("Conv", ["tr", "wb"], ["tout"], "then_conv2", pads=[1, 1, 1, 1])],
        "then", [], [helper.make_tensor_value_info("tout", F, None)],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Conv", ["x", "wc", "bc"], ["ea"], "else_conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["ea"], ["eout"], "else_relu")],
        "else", [], [helper.make_tensor_value_info("eout", F, None)],
    )  # fmt: skip
    nodes = [
        helper.make_node("If", ["wide"], ["branch"], "choose", then_branch=then, else_branch=other),
        helper.make_node("GlobalAveragePool", ["branch"], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["y"], "flatten"),
    ]
    graph = helper.make_graph(
        nodes, "if_model",
        [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8]),
         helper.make_tensor_value_info("wide", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F, ["N", 4])], inits,
    )  # fmt: skip
    return _model(graph)


def loop_model(seed: int = 0, steps: int = 3) -> onnx.ModelProto:
    """x (N,16) -> Loop 3 times: h = Relu(MatMul(h, W) + b + x) (h starts at x) -> MatMul(h, V) -> y (N,8); the
    body also hands each step's h out as a scan output (unused)."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "w", (16, 16), 0.25), _w(rng, "b", (16,), 0.1), _w(rng, "v", (16, 8)),
             numpy_helper.from_array(np.array(steps, np.int64), "steps"),
             numpy_helper.from_array(np.array(True), "go")]  # fmt: skip
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w"], ["hw"], "loop_matmul"),
         helper.make_node("Add", ["hw", "b"], ["hb"], "loop_bias"),
         helper.make_node("Add", ["hb", "x"], ["hx"], "loop_skip"),
         helper.make_node("Relu", ["hx"], ["h_next"], "loop_relu"),
         helper.make_node("Identity", ["cond"], ["cond_out"], "loop_cond"),
         helper.make_node("Identity", ["h_next"], ["h_step"], "loop_step")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("h", F, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_next", F, None), helper.make_tensor_value_info("h_step", F, None)],
    )  # fmt: skip
    nodes = [
        helper.make_node("Loop", ["steps", "go", "x"], ["h_final", "h_all"], "loop", body=body),
        helper.make_node("MatMul", ["h_final", "v"], ["y"], "head"),
    ]
    graph = helper.make_graph(nodes, "loop_model", [helper.make_tensor_value_info("x", F, ["N", 16])],
                              [helper.make_tensor_value_info("y", F, ["N", 8])], inits)  # fmt: skip
    return _model(graph)


def scan_model(seed: int = 0) -> onnx.ModelProto:
    """seq (N,T,8) -> Scan over T (axis 1): h = Tanh(MatMul(x_t, U) + MatMul(h, W)), h0 = 0 -> last h (N,16)."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "u", (8, 16)), _w(rng, "w", (16, 16), 0.2)]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "u"], ["xu"], "scan_input_matmul"),
         helper.make_node("MatMul", ["h", "w"], ["hw"], "scan_state_matmul"),
         helper.make_node("Add", ["xu", "hw"], ["pre"], "scan_add"),
         helper.make_node("Tanh", ["pre"], ["h_next"], "scan_tanh"),
         helper.make_node("Identity", ["h_next"], ["h_out"], "scan_out")],
        "body",
        [helper.make_tensor_value_info("h", F, ["N", 16]), helper.make_tensor_value_info("x_t", F, ["N", 8])],
        [helper.make_tensor_value_info("h_next", F, ["N", 16]), helper.make_tensor_value_info("h_out", F, ["N", 16])],
    )  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["seq"], ["shape"], "shape"),
        helper.make_node("Gather", ["shape", "zero"], ["n"], "batch", axis=0),
        helper.make_node("Concat", ["n", "width"], ["h_shape"], "h_shape", axis=0),
        helper.make_node("ConstantOfShape", ["h_shape"], ["h0"], "h0",
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Scan", ["h0", "seq"], ["h_last", "hs"], "scan", body=body, num_scan_inputs=1,
                         scan_input_axes=[1], scan_output_axes=[1]),
    ]  # fmt: skip
    inits += [numpy_helper.from_array(np.array([0], np.int64), "zero"),
              numpy_helper.from_array(np.array([16], np.int64), "width")]  # fmt: skip
    graph = helper.make_graph(nodes, "scan_model", [helper.make_tensor_value_info("seq", F, ["N", 5, 8])],
                              [helper.make_tensor_value_info("h_last", F, ["N", 16])], inits)  # fmt: skip
    return _model(graph)
