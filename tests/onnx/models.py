"""Small ONNX models built in code for the tests, with seeded random weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(rng, name, shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def convnet(seed: int = 0) -> onnx.ModelProto:
    """x (N,3,16,16) -> Conv -> BN -> Relu -> MaxPool -> Conv -> Add(skip) -> Relu -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "w1", (8, 3, 3, 3)),
        _init(rng, "b1", (8,), 0.1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_scale"),
        _init(rng, "bn_bias", (8,), 0.1),
        _init(rng, "bn_mean", (8,), 0.1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_var"),
        _init(rng, "w2", (8, 8, 3, 3), 0.2),
        _init(rng, "b2", (8,), 0.1),
        _init(rng, "fc_w", (5, 8)),
        _init(rng, "fc_b", (5,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn1"], "bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], "relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], "pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["s"], "add"),
        helper.make_node("Relu", ["s"], ["r2"], "relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], "fc", transB=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        inits,
    )


def mlp(seed: int = 0) -> onnx.ModelProto:
    """x (N,4,16) -> MatMul(16x32) -> Add(bias) -> Relu -> MatMul(32x8), plus a Gemm head on a second branch."""
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "w1", (16, 32)),
        _init(rng, "b1", (32,), 0.1),
        _init(rng, "w2", (32, 8)),
        _init(rng, "g_w", (6, 16)),
        _init(rng, "g_b", (6,), 0.1),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], "mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], "bias1"),
        helper.make_node("Relu", ["a1"], ["r1"], "relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], "mm2"),
        helper.make_node("ReduceMean", ["x"], ["xm"], "mean", axes=[1], keepdims=0),
        helper.make_node("Gemm", ["xm", "g_w", "g_b"], ["z"], "head", transB=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6]),
        ],
        inits,
        opset=17,
    )


def branching(seed: int = 0) -> onnx.ModelProto:
    """A Conv whose output an If node reads from inside both branches (control flow)."""
    rng = np.random.default_rng(seed)
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["c1"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["N", 4, 8, 8])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["c1"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["N", 4, 8, 8])],
    )
    inits = [
        _init(rng, "w1", (4, 3, 3, 3)),
        _init(rng, "w2", (4, 4, 1, 1)),
        numpy_helper.from_array(np.float32(0), "zero"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["x"], ["m"], "mean", keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["cond"], "greater"),
        helper.make_node("If", ["cond"], ["branch"], "if", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Conv", ["branch", "w2"], ["y"], "conv2"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )


def depthwise_net(seed: int = 0) -> onnx.ModelProto:
    """x (N,4,12,12) -> Conv 1x1 without bias -> Relu -> depthwise Conv 3x3 -> Relu -> Conv 1x1 in 2 groups -> GAP
    -> Flatten -> Gemm (transB 0): the layer kinds bias correction handles."""
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "w_expand", (8, 4, 1, 1), 0.5),
        _init(rng, "w_dw", (8, 1, 3, 3), 0.5),
        _init(rng, "b_dw", (8,), 0.1),
        _init(rng, "w_group", (8, 4, 1, 1), 0.5),
        _init(rng, "b_group", (8,), 0.1),
        _init(rng, "fc_w", (8, 6), 0.5),
        _init(rng, "fc_b", (6,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_expand"], ["e"], "expand"),
        helper.make_node("Relu", ["e"], ["e_relu"], "expand_relu"),
        helper.make_node("Conv", ["e_relu", "w_dw", "b_dw"], ["d"], "depthwise", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["d_relu"], "depthwise_relu"),
        helper.make_node("Conv", ["d_relu", "w_group", "b_group"], ["g"], "grouped", group=2),
        helper.make_node("GlobalAveragePool", ["g"], ["gap"], "gap"),
        helper.make_node("Flatten", ["gap"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], "fc"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])],
        inits,
    )


def single_layer(op, w, x_shape, **attrs):
    """One Conv/Gemm/MatMul node ``layer`` reading input ``x`` and the constant weight ``w``; (model, output units)."""
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    out_dim = w.shape[0] if op == "Conv" or attrs.get("transB") else w.shape[1]
    node = helper.make_node(op, ["x", "w"], ["y"], "layer", **attrs)
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, out_dim


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def calib_data(path, shape, n: int = 48, seed: int = 1, name: str = "x") -> str:
    rng = np.random.default_rng(seed)
    np.savez(path, **{name: rng.standard_normal((n, *shape)).astype(np.float32)})
    return str(path)
