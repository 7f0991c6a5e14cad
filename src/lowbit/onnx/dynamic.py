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

from lowbit.onnx.graph import Graph, Names, attribute, attributes
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
        attrs = attributes(node)
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
    excluded = exclusion(exclude, exclude_ops)
    build = _Dynamic(out.graph, graph, per_channel)
    for node in out.graph.node:
        label = graph.node_name(node)
        table = _table(graph, node)
        if table is not None and not excluded(graph, node):
            build.table(node, table, label)
        elif tables_only:
            build.nodes.append(node)
        elif _recurrent(graph, node) and (node.op_type == "LSTM" or weight_only_rnn):
            build.keep(node, label) if excluded(graph, node) else build.recurrent(node, label)
        else:
            w = _weight(graph, node)
            if w is None:
                build.nodes.append(node)
            elif excluded(graph, node):
                build.keep(node, label)
            else:
                build.matmul(node, w, label)
    build.finish(out)
    return out, build.plan


class _Dynamic:
    """The nodes and initializers :func:`quantize_dynamic` writes, node by node, and the weights they replace."""

    def __init__(self, g: onnx.GraphProto, graph: Graph, per_channel: bool):
        self.g, self.graph, self.per_channel, self.names = g, graph, per_channel, Names(g)
        self.plan = DynamicPlan()
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self.quantized_inputs: dict[str, tuple[str, str, str]] = {}  # one DynamicQuantizeLinear per activation
        self.weight_users: dict[str, int] = {}
        for node in g.node:
            for name in node.input:
                self.weight_users[name] = self.weight_users.get(name, 0) + 1

    def init(self, base: str, array: np.ndarray) -> str:
        return self.names.initializer(base, array, self.inits)

    def keep(self, node: onnx.NodeProto, label: str) -> None:
        """An excluded node, left as it is."""
        self.plan.excluded_nodes.append(label)
        self.nodes.append(node)

    def table(self, node: onnx.NodeProto, table: np.ndarray, label: str) -> None:
        """An embedding lookup: gather int8 rows and their scales, then dequantize only the rows gathered. A scale
        per row: in all-MiniLM-L6-v2's word table the largest value of a typical row is 0.18 and of the largest
        row 1.05, so one scale would leave most rows a sixth of the codes."""
        new = self.names.new
        p, q = weight_qparams(table, 0)
        base, y, ids = node.input[0], node.output[0], node.input[1]
        gathered, scales, as_float = new(f"{y}_quantized"), new(f"{y}_scale"), new(f"{y}_quantized_float")
        q_name = self.init(f"{base}_quantized", q)
        scale_name = self.init(f"{base}_scale", np.asarray(p.scale, np.float32).reshape(-1, 1))
        attrs = attributes(node)
        self.nodes += [
            helper.make_node("Gather", [q_name, ids], [gathered], name=label, **attrs),
            helper.make_node("Gather", [scale_name, ids], [scales], name=new(f"{label}_scale"), **attrs),
            helper.make_node("Cast", [gathered], [as_float], to=onnx.TensorProto.FLOAT, name=new(f"{label}_Cast")),
            helper.make_node("Mul", [as_float, scales], [y], name=new(f"{label}_Dequantize")),
        ]
        self.plan.quantized_nodes.append(label)
        self.weight_users[base] -= 1

    def recurrent(self, node: onnx.NodeProto, label: str) -> None:
        self.nodes += _quantize_recurrent(node, self.graph, self.names, self.init, self.per_channel)
        for name in node.input[1:3]:
            self.weight_users[name] -= 1
        self.plan.quantized_nodes.append(label)

    def matmul(self, node: onnx.NodeProto, w: np.ndarray, label: str) -> None:
        """MatMulInteger on the run-time quantized input and the int8 weight, rescaled (and the Gemm bias added)."""
        new = self.names.new
        a, y = node.input[0], node.output[0]
        if a not in self.quantized_inputs:
            outs = (new(f"{a}_quantized"), new(f"{a}_scale"), new(f"{a}_zero_point"))
            self.nodes.append(
                helper.make_node("DynamicQuantizeLinear", [a], list(outs), name=new(f"{a}_DynamicQuantize"))
            )
            self.quantized_inputs[a] = outs
        a_q, a_scale, a_zp = self.quantized_inputs[a]
        p, w_q = weight_qparams(w, 1 if self.per_channel else None)
        w_scale = np.broadcast_to(p.scale, (w.shape[1],)) if self.per_channel else p.scale
        base = node.input[1]
        w_name, zp_name = self.init(f"{base}_quantized", w_q), self.init(f"{base}_zero_point", p.zero_point)
        scale_name = self.init(f"{base}_scale", np.asarray(w_scale, np.float32))
        acc, acc_f, scale_ab = new(f"{y}_int32"), new(f"{y}_int32_float"), new(f"{y}_scale")
        bias = _gemm_bias(self.graph, node)
        scaled = y if bias is None else new(f"{y}_no_bias")
        self.nodes += [
            helper.make_node("MatMulInteger", [a_q, w_name, a_zp, zp_name], [acc], name=new(f"{label}_MatMulInteger")),
            helper.make_node("Cast", [acc], [acc_f], to=onnx.TensorProto.FLOAT, name=new(f"{label}_Cast")),
            helper.make_node("Mul", [a_scale, scale_name], [scale_ab], name=new(f"{label}_Scale")),
            helper.make_node("Mul", [acc_f, scale_ab], [scaled], name=new(f"{label}_Rescale")),
        ]
        if bias is not None:
            self.nodes.append(
                helper.make_node("Add", [scaled, self.init(f"{y}_bias", bias)], [y], name=new(f"{label}_Bias"))
            )
        self.plan.quantized_nodes.append(label)
        self.weight_users[base] -= 1

    def finish(self, out: onnx.ModelProto) -> None:
        """Drop the float weights no node reads any more, add the new ones, and the Microsoft opset if needed."""
        g = self.g
        unused = {name for name, users in self.weight_users.items() if users == 0}
        kept = [t for t in g.initializer if t.name not in unused]
        del g.initializer[:]
        g.initializer.extend(kept + self.inits)
        del g.node[:]
        g.node.extend(self.nodes)
        if any(n.domain == MS_DOMAIN for n in self.nodes) and not any(o.domain == MS_DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


MS_DOMAIN = "com.microsoft"


def _recurrent(graph: Graph, node: onnx.NodeProto) -> bool:
    """An LSTM/GRU/RNN with constant float 3-D W and R, time-major (layout 0)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("LSTM", "GRU", "RNN") or len(node.input) < 3:
        return False
    if attributes(node).get("layout", 0) != 0:
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
        attrs = {k: v for k, v in attributes(node).items() if k != "layout"}
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
    axis = attribute(node, "axis", 0)
    data = node.input[0]
    if axis != 0 or not (graph.is_constant(data) and graph.is_float(data)) or graph.rank(data) != 2:
        return None
    table = graph.value(data)
    return table.astype(np.float32) if table.size >= 4096 else None


def _gemm_bias(graph: Graph, node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
        return None
    beta = attribute(node, "beta", 1.0)
    return (graph.value(node.input[2]) * np.float32(beta)).astype(np.float32)
