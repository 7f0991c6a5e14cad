"""What quantizing an op means: which inputs are activations, which are weights (and along which axis they get
per-channel scales), which input is a bias, and how its output relates to its input.

A rule is plain data in a registry keyed by op type; supporting a new op is one :func:`register` call.

Kinds of op:
- ``compute``: Conv, ConvTranspose, Gemm, MatMul. Integer matrix products; weights per output channel.
- ``elementwise``: Add, Mul, Concat, AveragePool, ...: integer kernels that take quantized inputs and produce a
  quantized output with its own range.
- ``share``: MaxPool, Reshape, Transpose, ...: move or select values, so the output keeps the input's
  scale and zero point and the op runs on integers for free.
- ``activation``: Relu, Clip: a quantizer placed after them does their job (a uint8 zero point of 0 clips at 0),
  so their input needs no quantizer of its own and ONNX Runtime drops them.
- ``lookup``: Sigmoid, LeakyRelu, HardSwish, ...: quantized input and output with its own range (QLinearSigmoid
  and QLinearLeakyRelu are table lookups in ORT; the others run in float between a DequantizeLinear and a
  QuantizeLinear).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from lowbit.onnx.graph import Graph, attribute, subgraphs

KINDS = ("compute", "elementwise", "share", "activation", "lookup")


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized. ``weight_axis(node, graph, index)`` gives the per-channel axis of a weight
    input (``None``: per tensor only)."""

    kind: str
    data_inputs: tuple[int, ...] | None = (0,)  # None: every input
    weight_inputs: tuple[int, ...] = ()
    bias_input: int | None = None
    weight_axis: Callable[[onnx.NodeProto, Graph, int], int | None] = field(default=lambda node, graph, index: None)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}; kinds are {KINDS}")

    def activation_inputs(self, node: onnx.NodeProto) -> list[int]:
        indices = range(len(node.input)) if self.data_inputs is None else self.data_inputs
        return [i for i in indices if i < len(node.input) and node.input[i] and i not in self.weight_inputs]


RULES: dict[str, OpRule] = {}


def register(op_types: str | tuple[str, ...], rule: OpRule) -> None:
    """Make ``rule`` the rule of each op type in ``op_types`` (default ONNX domain)."""
    for op in (op_types,) if isinstance(op_types, str) else op_types:
        RULES[op] = rule


def rule_for(node: onnx.NodeProto) -> OpRule | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return RULES.get(node.op_type)


def _conv_axis(node, graph, index):
    return 0  # W is (C_out, C_in / group, k...)


def _conv_transpose_axis(node, graph, index):
    # W is (C_in, C_out / group, k...): axis 1 names every output channel only when group == 1.
    return 1 if attribute(node, "group", 1) == 1 else None


def _gemm_axis(node, graph, index):
    if index != 1:
        return None
    return 0 if attribute(node, "transB", 0) else 1  # output channels of B: rows when transposed, columns otherwise


def _matmul_axis(node, graph, index):
    # Per column of a 2-D B (the output features); batched weights and a constant A get one scale.
    return 1 if index == 1 and graph.rank(node.input[1]) == 2 else None


register("Conv", OpRule("compute", (0,), (1,), 2, _conv_axis))
register("ConvTranspose", OpRule("compute", (0,), (1,), 2, _conv_transpose_axis))
register("Gemm", OpRule("compute", (0, 1), (1,), 2, _gemm_axis))
register("MatMul", OpRule("compute", (0, 1), (1,), None, _matmul_axis))
register(("Add", "Mul", "Concat"), OpRule("elementwise", None))
register(("AveragePool", "GlobalAveragePool"), OpRule("elementwise"))
register(
    (
        "MaxPool",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Resize",
        "Slice",
        "Split",
        "Gather",
        "DepthToSpace",
        "SpaceToDepth",
    ),
    OpRule("share"),
)
register(("Relu", "Clip"), OpRule("activation"))
register(("Sigmoid", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh", "Gelu"), OpRule("lookup"))


def scalar_factor(graph: Graph, node: onnx.NodeProto) -> float | None:
    """``c`` for a ``Mul`` of an activation by a positive one-element constant ``c`` (``1 / c`` for a ``Div`` by
    one), else None. Such an op changes only the scale of a quantized tensor: its codes stay, so it folds into the
    scale of the DequantizeLinear that reads them."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    a, b = node.input
    if node.op_type == "Mul" and graph.is_constant(a):
        a, b = b, a
    if not (graph.is_activation(a) and graph.is_constant(b) and graph.is_float(b)):
        return None
    c = graph.value(b)
    if c.size != 1 or len(c.shape) > (graph.rank(a) or 0):
        return None
    c = float(c.reshape(-1)[0])
    if not (np.isfinite(c) and c > 0):
        return None
    return c if node.op_type == "Mul" else 1.0 / c


def unit_output(graph: Graph, name: str) -> str:
    """The tensor a layer's error is read at: its output, or the output of the Relu/Clip right after it (the
    quantizer there does the activation's job, so the layer's own output is never quantized). The layer may sit
    inside an If/Loop/Scan body."""
    found = _find_node(graph, name)
    if found is None:
        raise KeyError(f"no node named {name!r}")
    graph, node = found
    tensor = node.output[0]
    while True:
        readers = graph.consumers.get(tensor, [])
        rule = rule_for(readers[0]) if len(readers) == 1 else None
        if rule is None or rule.kind != "activation" or tensor in graph.outputs:
            return tensor
        tensor = readers[0].output[0]


def _find_node(graph: Graph, name: str) -> tuple[Graph, onnx.NodeProto] | None:
    """The graph (the main one or a body, as a :class:`Graph` view) holding the node called ``name``, and it."""
    node = next((n for n in graph.nodes if graph.node_name(n) == name), None)
    if node is not None:
        return graph, node
    for holder in graph.nodes:
        for body in subgraphs(holder):
            found = _find_node(Graph(graph.model, body, outer=graph), name)
            if found is not None:
                return found
    return None
