"""Functions of one tensor: connected pieces of a graph that apply the same scalar function to every element of one
input, such as a hard-swish exported as ``x * Clip(x + 3, 0, 6) / 6`` or a GELU as ``0.5 * x * (1 + Erf(x / 1.41))``.

A :class:`Region` is such a piece: its nodes are elementwise float ops (unary ones, and binary ones whose other
operand is a one-element constant or another tensor of the same piece), it reads one tensor from outside (``source``)
and exactly one of its tensors is read outside it (``result``). Its function can be evaluated on any values
(:meth:`Region.evaluate`, by ONNX Runtime on the region's own nodes), which is what recognising an activation by
what it computes, rather than by how it was written, needs (:mod:`lowbit.onnx.activations`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from lowbit.onnx.graph import Graph
from lowbit.onnx.model import session as model_session

UNARY = frozenset(
    "Relu Clip Sigmoid Tanh Erf Exp Log Neg Abs Sqrt Reciprocal HardSigmoid HardSwish LeakyRelu Elu Selu Celu "
    "Softplus Softsign Gelu Mish ThresholdedRelu Swish".split()
)
BINARY = frozenset("Add Sub Mul Div Pow Max Min".split())


@dataclass
class Region:
    """Nodes (in graph order) computing ``result = f(source)`` elementwise."""

    source: str
    result: str
    nodes: list[onnx.NodeProto]
    constants: dict[str, onnx.TensorProto]
    opsets: list[onnx.OperatorSetIdProto]

    def cuts(self) -> list[str]:
        """The tensors the region can be cut at, in graph order, ending with ``result``: a tensor ``t`` such that
        the nodes computing it read nothing but ``source`` and each other, and the nodes after it read nothing
        from before it but ``t`` itself. ``f`` is then ``g(h(source))`` with ``t = h(source)``."""
        made = {out: n for n in self.nodes for out in n.output}
        found = []
        for node in self.nodes:
            t = node.output[0]
            before = self._ancestors(t, made)
            produced_before = {out for n in before for out in n.output}
            after = [n for n in self.nodes if id(n) not in {id(b) for b in before}]
            reads_after = {i for n in after for i in n.input if i and i not in self.constants}
            if not (reads_after & (produced_before | {self.source})) - {t}:
                found.append(t)
        return found

    def _ancestors(self, tensor: str, made: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
        seen: set[int] = set()
        stack = [tensor]
        while stack:
            node = made.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend(node.input)
        return [n for n in self.nodes if id(n) in seen]

    def segment(self, start: str, end: str) -> Region:
        """The piece between two cuts (``start`` may be ``source``): ``end`` as a function of ``start``."""
        made = {out: n for n in self.nodes for out in n.output}
        skip = {id(n) for n in self._ancestors(start, made)} if start != self.source else set()
        nodes = [n for n in self._ancestors(end, made) if id(n) not in skip]
        constants = {t: c for t, c in self.constants.items() if any(t in n.input for n in nodes)}
        return Region(start, end, nodes, constants, self.opsets)

    def evaluate(self, values: np.ndarray) -> np.ndarray:
        """f of each of ``values`` (a 1-D float32 array), computed by ONNX Runtime on the region's nodes."""
        x = helper.make_tensor_value_info(self.source, onnx.TensorProto.FLOAT, [None])
        y = helper.make_tensor_value_info(self.result, onnx.TensorProto.FLOAT, None)
        graph = helper.make_graph(list(self.nodes), "region", [x], [y], list(self.constants.values()))
        return run_function(helper.make_model(graph, opset_imports=self.opsets), values)


def run_function(model: onnx.ModelProto, values: np.ndarray) -> np.ndarray:
    """The one output of ``model`` (one input) on ``values``; shaped like ``values``."""
    session = model_session(model, optimize=False)
    out = session.run(None, {session.get_inputs()[0].name: np.asarray(values, np.float32)})[0]
    return np.broadcast_to(out, np.shape(values)) if out.size == np.size(values) else out


def _scalar_constant(graph: Graph, name: str) -> bool:
    return graph.is_constant(name) and graph.is_float(name) and int(np.prod(graph.constants[name].dims)) == 1


def _operands(graph: Graph, node: onnx.NodeProto) -> list[str] | None:
    """The tensor inputs of an elementwise float op (its constants are one-element floats), or None when the node
    is not one."""
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1 or not graph.is_float(node.output[0]):
        return None
    if node.op_type in UNARY:
        extra = node.input[1:]
        if extra and not (node.op_type == "Clip" and all(not t or _scalar_constant(graph, t) for t in extra)):
            return None
        return [node.input[0]] if node.input and graph.is_activation(node.input[0]) else None
    if node.op_type in BINARY:
        tensors = [t for t in node.input if not _scalar_constant(graph, t)]
        if not tensors or any(not graph.is_activation(t) for t in tensors):
            return None
        return tensors
    return None


def _same_rank(graph: Graph, node: onnx.NodeProto, source: str) -> bool:
    """A constant operand must not broadcast the source to a higher rank."""
    rank = graph.rank(source)
    return all(
        len(graph.constants[t].dims) <= (rank if rank is not None else 0) for t in node.input if graph.is_constant(t)
    )


def regions(graph: Graph) -> list[Region]:
    """Every maximal connected piece of ``graph`` that computes one elementwise function of one tensor and is read
    outside through one tensor (pieces of one node are included; a piece whose intermediate tensors are read
    elsewhere is not one)."""
    root: dict[str, str] = {}
    members: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.nodes:  # topological order: every operand's root is known before its readers'
        tensors = _operands(graph, node)
        if tensors is None:
            continue
        roots = {root.get(t, t) for t in tensors}
        if len(roots) != 1:
            continue
        source = roots.pop()
        if not _same_rank(graph, node, source):
            continue
        root[node.output[0]] = source
        members.setdefault(source, []).append(node)
    found = []
    for source, nodes in members.items():
        for piece in _connected(nodes):
            region = _region(graph, source, piece)
            if region is not None:
                found.append(region)
    return found


def _connected(nodes: list[onnx.NodeProto]) -> list[list[onnx.NodeProto]]:
    """``nodes`` split into pieces linked by the tensors one produces and another reads (graph order kept)."""
    parent = list(range(len(nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    made = {out: i for i, n in enumerate(nodes) for out in n.output}
    for i, node in enumerate(nodes):
        for t in node.input:
            if t in made:
                parent[find(i)] = find(made[t])
    pieces: dict[int, list[onnx.NodeProto]] = {}
    for i, node in enumerate(nodes):
        pieces.setdefault(find(i), []).append(node)
    return list(pieces.values())


def _region(graph: Graph, source: str, nodes: list[onnx.NodeProto]) -> Region | None:
    inside = {id(n) for n in nodes}
    escaping = [
        n.output[0]
        for n in nodes
        if n.output[0] in graph.outputs
        or n.output[0] in graph.subgraph_reads
        or any(id(c) not in inside for c in graph.consumers.get(n.output[0], []))
    ]
    if len(escaping) != 1:
        return None
    constants = {t: graph.constants[t] for n in nodes for t in n.input if t and graph.is_constant(t)}
    constants = {t: _renamed(c, t) for t, c in constants.items()}
    return Region(source, escaping[0], nodes, constants, list(graph.model.opset_import))


def _renamed(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    """A copy of a constant under the name the region reads it by (a Constant node's value has no name)."""
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy
