"""Dynamic quantization: weights of MatMul/Gemm quantized offline (int8, per output column), activations quantized
at run time with a scale computed from each batch, so no calibration data is needed. Embedding tables (Gather from
a constant 2-D table) are stored as int8 too (a scale per row): the int8 rows and their scales are gathered, then
multiplied.

    A -> DynamicQuantizeLinear -> (A_q uint8, s_a, z_a)
    MatMulInteger(A_q, W_q, z_a, z_w) -> int32 -> Cast -> * (s_a * s_w) [-> + bias]

ONNX Runtime fuses this pattern into its DynamicQuantizeMatMul kernel. One DynamicQuantizeLinear serves every
MatMul that reads the same activation (the Q, K and V projections of a transformer layer).

Recurrent layers: an LSTM becomes ONNX Runtime's ``com.microsoft.DynamicQuantizeLSTM`` (int8 input and recurrent
weights, per gate row; the activations of every time step quantized at run time). GRU and RNN have no integer
kernel in ONNX Runtime: they stay in float unless ``weight_only_rnn`` asks for int8 weights dequantized at run
time (4x smaller files, but slower than FP32: ONNX Runtime dequantizes them on every run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from lowbit.onnx.graph import Graph, Names
from lowbit.onnx.placement import exclusion
from lowbit.onnx.rewrite import weight_qparams


@dataclass
class DynamicPlan:
    quantized_nodes: list[str] = field(default_factory=list)
    excluded_nodes: list[str] = field(default_factory=list)


def _weight(graph: Graph, node: onnx.NodeProto) -> np.ndarray | None:
    """The constant (K, N) weight of a MatMul/Gemm node, or None when it has none this can use."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    a, b = node.input[0], node.input[1]
    if not (graph.is_activation(a) and graph.is_constant(b) and graph.is_float(b)):
        return None
    w = graph.value(b)
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if attrs.get("transA", 0):
            return None
        if len(node.input) > 2 and node.input[2] and not graph.is_constant(node.input[2]):
            return None  # a bias computed at run time: leave the node in float
        w = w.T if attrs.get("transB", 0) else w
        w = w * np.float32(attrs.get("alpha", 1.0))
    return np.ascontiguousarray(w, dtype=np.float32)


def quantize_dynamic(
    model: onnx.ModelProto,
    *,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    per_channel: bool = True,
    weight_only_rnn: bool = False,
    tables_only: bool = False,
) -> tuple[onnx.ModelProto, DynamicPlan]:
    """A copy of ``model`` whose MatMul/Gemm with constant 2-D weights (and LSTMs) run on int8 with run-time
    activation scales; embedding tables, and with ``weight_only_rnn`` GRU/RNN weights, are stored as int8.
    ``tables_only``: only the embedding tables (static quantization leaves them in float: they feed no compute
    op, yet they are most of a transformer's file)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = Graph(out)
    g = out.graph
    names = Names(g)
    excluded = exclusion(exclude, exclude_ops)
    plan = DynamicPlan()
    inits: list[onnx.TensorProto] = []
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    nodes: list[onnx.NodeProto] = []
    weight_users: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            weight_users[name] = weight_users.get(name, 0) + 1

    def init(base: str, array: np.ndarray) -> str:
        return names.initializer(base, array, inits)

    for node in g.node:
        label = graph.node_name(node)
        table = _table(graph, node)
        if table is not None and not excluded(graph, node):
            # An embedding lookup: gather int8 rows and their scales, then dequantize only the rows gathered. A
            # scale per row: in all-MiniLM-L6-v2's word table the largest value of a typical row is 0.18 and of the
            # largest row 1.05, so one scale would leave most rows a sixth of the codes.
            p, q = weight_qparams(table, 0)
            base, y, ids = node.input[0], node.output[0], node.input[1]
            gathered, scales = names.new(f"{y}_quantized"), names.new(f"{y}_scale")
            as_float = names.new(f"{y}_quantized_float")
            q_name = init(f"{base}_quantized", q)
            scale_name = init(f"{base}_scale", np.asarray(p.scale, np.float32).reshape(-1, 1))
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            nodes += [
                helper.make_node("Gather", [q_name, ids], [gathered], name=label, **attrs),
                helper.make_node("Gather", [scale_name, ids], [scales], name=names.new(f"{label}_scale"), **attrs),
                helper.make_node(
                    "Cast", [gathered], [as_float], to=onnx.TensorProto.FLOAT, name=names.new(f"{label}_Cast")
                ),
                helper.make_node("Mul", [as_float, scales], [y], name=names.new(f"{label}_Dequantize")),
            ]
            plan.quantized_nodes.append(label)
            weight_users[base] -= 1
            continue
        if tables_only:
            nodes.append(node)
            continue
        w = _weight(graph, node)
        if _recurrent(graph, node) and (node.op_type == "LSTM" or weight_only_rnn):
            if excluded(graph, node):
                plan.excluded_nodes.append(label)
                nodes.append(node)
                continue
            nodes += _quantize_recurrent(node, graph, names, init, per_channel)
            for name in node.input[1:3]:
                weight_users[name] -= 1
            plan.quantized_nodes.append(label)
            continue
        if w is not None and excluded(graph, node):
            plan.excluded_nodes.append(label)
            w = None
        if w is None:
            nodes.append(node)
            continue
        a, y = node.input[0], node.output[0]
        if a not in quantized_inputs:
            outs = [names.new(f"{a}_quantized"), names.new(f"{a}_scale"), names.new(f"{a}_zero_point")]
            nodes.append(helper.make_node("DynamicQuantizeLinear", [a], outs, name=names.new(f"{a}_DynamicQuantize")))
            quantized_inputs[a] = tuple(outs)  # type: ignore[assignment]
        a_q, a_scale, a_zp = quantized_inputs[a]
        p, w_q = weight_qparams(w, 1 if per_channel else None)
        w_scale = np.broadcast_to(p.scale, (w.shape[1],)) if per_channel else p.scale
        base = node.input[1]
        w_name, zp_name = init(f"{base}_quantized", w_q), init(f"{base}_zero_point", p.zero_point)
        scale_name = init(f"{base}_scale", np.asarray(w_scale, np.float32))
        acc, acc_f, scale_ab = names.new(f"{y}_int32"), names.new(f"{y}_int32_float"), names.new(f"{y}_scale")
        nodes += [
            helper.make_node(
                "MatMulInteger", [a_q, w_name, a_zp, zp_name], [acc], name=names.new(f"{label}_MatMulInteger")
            ),
            helper.make_node("Cast", [acc], [acc_f], to=onnx.TensorProto.FLOAT, name=names.new(f"{label}_Cast")),
            helper.make_node("Mul", [a_scale, scale_name], [scale_ab], name=names.new(f"{label}_Scale")),
        ]
        bias = _gemm_bias(graph, node)
        if bias is None:
            nodes.append(helper.make_node("Mul", [acc_f, scale_ab], [y], name=names.new(f"{label}_Rescale")))
        else:
            scaled = names.new(f"{y}_no_bias")
            nodes.append(helper.make_node("Mul", [acc_f, scale_ab], [scaled], name=names.new(f"{label}_Rescale")))
            nodes.append(
                helper.make_node("Add", [scaled, init(f"{y}_bias", bias)], [y], name=names.new(f"{label}_Bias"))
            )
        plan.quantized_nodes.append(label)
        weight_users[base] -= 1

    unused = {name for name, users in weight_users.items() if users == 0}
    kept = [t for t in g.initializer if t.name not in unused]
    del g.initializer[:]
    g.initializer.extend(kept + inits)
    del g.node[:]
    g.node.extend(nodes)
    if any(n.domain == MS_DOMAIN for n in nodes) and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out, plan


MS_DOMAIN = "com.microsoft"


def _recurrent(graph: Graph, node: onnx.NodeProto) -> bool:
    """An LSTM/GRU/RNN with constant float 3-D W and R, time-major (layout 0)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("LSTM", "GRU", "RNN") or len(node.input) < 3:
        return False
    if any(a.name == "layout" and helper.get_attribute_value(a) != 0 for a in node.attribute):
        return False
    return all(graph.is_constant(n) and graph.is_float(n) and graph.rank(n) == 3 for n in node.input[1:3])


def _gate_rows(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and scales of a recurrent weight (directions, gates * hidden, inputs): one scale per gate row of
    each direction, shaped (directions, gates * hidden), or with ``per_channel=False`` one per direction, shaped
    (directions,) -- the shapes DynamicQuantizeLSTM accepts."""
    d, rows, _ = w.shape
    w = w.astype(np.float32)
    if per_channel:
        p, q = weight_qparams(w.reshape(d * rows, -1), 0)
        return q.reshape(w.shape), np.asarray(p.scale, np.float32).reshape(d, rows)
    parts = [weight_qparams(w[k], None) for k in range(d)]
    return np.stack([q for _, q in parts]), np.array([p.scale for p, _ in parts], np.float32)


def _quantize_recurrent(node: onnx.NodeProto, graph: Graph, names: Names, init, per_channel: bool):
    """The nodes that replace a recurrent ``node``: DynamicQuantizeLSTM for an LSTM; int8 W and R dequantized
    into the unchanged node for GRU/RNN."""
    label = graph.node_name(node)
    codes = {i: _gate_rows(graph.value(node.input[i]), per_channel) for i in (1, 2)}
    if node.op_type == "LSTM":
        inputs = [node.input[0]]
        for i in (1, 2):  # the kernel wants (directions, inputs, 4 * hidden)
            inputs.append(init(f"{node.input[i]}_quantized", np.ascontiguousarray(codes[i][0].transpose(0, 2, 1))))
        inputs += [node.input[i] if len(node.input) > i else "" for i in range(3, 8)]
        for i in (1, 2):
            scale = codes[i][1]
            inputs += [
                init(f"{node.input[i]}_scale", scale),
                init(f"{node.input[i]}_zero_point", np.zeros_like(scale, np.int8)),
            ]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "layout"}
        return [
            helper.make_node("DynamicQuantizeLSTM", inputs, list(node.output), name=label, domain=MS_DOMAIN, **attrs)
        ]
    out = []
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for i in (1, 2):
        q, scale = codes[i]
        base = node.input[i]
        rows = names.new(f"{base}_rows")
        flat = q.reshape(-1, q.shape[2])
        row_scale = np.broadcast_to(scale.reshape(scale.shape[0], -1), q.shape[:2]).reshape(-1)  # one per row
        dq_inputs = [init(f"{base}_quantized", flat), init(f"{base}_scale", np.ascontiguousarray(row_scale))]
        dq_inputs.append(init(f"{base}_zero_point", np.zeros(row_scale.shape, np.int8)))
        out.append(
            helper.make_node("DequantizeLinear", dq_inputs, [rows], name=names.new(f"{base}_Dequantize"), axis=0)
        )
        restored = names.new(f"{base}_dequantized")
        shape = init(f"{base}_shape", np.array(q.shape, np.int64))
        out.append(helper.make_node("Reshape", [rows, shape], [restored], name=names.new(f"{base}_Reshape")))
        copy.input[i] = restored
    return [*out, copy]


def _table(graph: Graph, node: onnx.NodeProto) -> np.ndarray | None:
    """The constant float table of an embedding lookup (Gather of rows from a 2-D table of at least 4,096
    values), or None."""
    if node.domain not in ("", "ai.onnx") or node.op_type != "Gather" or len(node.input) < 2:
        return None
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    data = node.input[0]
    if axis != 0 or not (graph.is_constant(data) and graph.is_float(data)) or graph.rank(data) != 2:
        return None
    table = graph.value(data)
    return table.astype(np.float32) if table.size >= 4096 else None


def _gemm_bias(graph: Graph, node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
        return None
    beta = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "beta"), 1.0)
    return (graph.value(node.input[2]) * np.float32(beta)).astype(np.float32)
