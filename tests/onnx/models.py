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


def attention_block(seed: int = 0, hidden: int = 16) -> onnx.ModelProto:
    """A one-head transformer block as exporters write it: x (N,T,hidden) and an additive mask (N,1,T) of 0 or
    -10000 -> q/k/v MatMul + bias Add -> scores MatMul -> Mul(scale) -> Add(mask) -> Softmax -> MatMul(v) ->
    MatMul + bias -> residual Add -> LayerNormalization -> MatMul + bias -> GELU (Mul, Erf, Add, Mul, Mul) ->
    MatMul + bias -> residual Add -> LayerNormalization."""
    rng = np.random.default_rng(seed)
    h = hidden
    inits = [_init(rng, f"{n}_w", (h, 4 * h if n == "up" else h), 0.4) for n in ("q", "k", "v", "o", "up")]
    inits += [_init(rng, "down_w", (4 * h, h), 0.2)]
    inits += [_init(rng, f"{n}_b", (4 * h if n == "up" else h,), 0.1) for n in ("q", "k", "v", "o", "up", "down")]
    inits += [
        numpy_helper.from_array(np.ones(h, np.float32), "ln_scale"),
        numpy_helper.from_array(np.zeros(h, np.float32), "ln_bias"),
        numpy_helper.from_array(np.array(h**-0.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(2**-0.5, np.float32), "inv_sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = []
    for n in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", ["x", f"{n}_w"], [f"{n}_mm"], f"{n}_matmul"),
            helper.make_node("Add", [f"{n}_mm", f"{n}_b"], [n], f"{n}_add"),
        ]
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], "k_transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], "scores"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], "scaled"),
        helper.make_node("Add", ["scaled", "mask"], ["masked"], "masked"),
        helper.make_node("Softmax", ["masked"], ["probs"], "softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["context"], "context"),
        helper.make_node("MatMul", ["context", "o_w"], ["o_mm"], "o_matmul"),
        helper.make_node("Add", ["o_mm", "o_b"], ["o"], "o_add"),
        helper.make_node("Add", ["o", "x"], ["res1"], "residual1"),
        helper.make_node("LayerNormalization", ["res1", "ln_scale", "ln_bias"], ["ln1"], "ln1", axis=-1),
        helper.make_node("MatMul", ["ln1", "up_w"], ["up_mm"], "up_matmul"),
        helper.make_node("Add", ["up_mm", "up_b"], ["up"], "up_add"),
        helper.make_node("Mul", ["up", "inv_sqrt2"], ["gx"], "gelu_x"),
        helper.make_node("Erf", ["gx"], ["erf"], "gelu_erf"),
        helper.make_node("Add", ["erf", "one"], ["erf1"], "gelu_1p"),
        helper.make_node("Mul", ["up", "erf1"], ["gm"], "gelu_mul"),
        helper.make_node("Mul", ["gm", "half"], ["gelu"], "gelu"),
        helper.make_node("MatMul", ["gelu", "down_w"], ["down_mm"], "down_matmul"),
        helper.make_node("Add", ["down_mm", "down_b"], ["down"], "down_add"),
        helper.make_node("Add", ["down", "ln1"], ["res2"], "residual2"),
        helper.make_node("LayerNormalization", ["res2", "ln_scale", "ln_bias"], ["y"], "ln2", axis=-1),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", h]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, "T"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", h])],
        inits,
    )


def attention_feeds(n: int = 32, tokens: int = 12, hidden: int = 16, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs for :func:`attention_block`: random tokens and a mask hiding a random tail of each sequence."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, tokens + 1, n)
    mask = np.where(np.arange(tokens)[None, :] < lengths[:, None], 0.0, -10000.0).astype(np.float32)[:, None, :]
    return {"x": rng.standard_normal((n, tokens, hidden)).astype(np.float32), "mask": mask}
