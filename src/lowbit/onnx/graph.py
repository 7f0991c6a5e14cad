"""A read-only index over an ONNX graph: who produces and who consumes each tensor, its type, its constant value.

Only the main graph is indexed for rewriting; names that subgraphs (If/Loop/Scan bodies) read from the outer
scope are recorded so that a rewrite never takes a tensor away from them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT = onnx.TensorProto.FLOAT


def attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values, by name."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def attribute(node: onnx.NodeProto, name: str, default=None):
    """One attribute of a node as a Python value, ``default`` when the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs a node holds as attributes: the bodies of If, Loop and Scan."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every body inside it, at any depth (outer ones first)."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from graphs(sub)


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads but does not define: tensors of an enclosing scope."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        defined.update(node.output)
        for sub in subgraphs(node):
            used |= _outer_names(sub)
    used.update(o.name for o in graph.output)
    return used - defined


class Graph:
    """Producer, consumers, element type and constant value of every tensor of ``model.graph``, or of ``body``
    (the body of an If, Loop or Scan somewhere in ``model``) seen from inside: with ``outer``, the :class:`Graph`
    of the scope around it, the body's ``inputs`` are its own inputs and the float tensors it reads from outer
    scopes (values it does not compute), and outer constants and types are known by name."""

    def __init__(self, model: onnx.ModelProto, body: onnx.GraphProto | None = None, outer: Graph | None = None):
        self.model = model
        g = model.graph if body is None else body
        self.proto = g
        self.nodes = list(g.node)
        self.initializers = {t.name: t for t in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.outputs = [o.name for o in g.output]
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.subgraph_reads: set[str] = set()
        self.constants: dict[str, onnx.TensorProto] = {} if outer is None else dict(outer.constants)
        self.constants.update(self.initializers)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            for sub in subgraphs(node):
                self.subgraph_reads |= _outer_names(sub)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = attribute(node, "value")
                if value is not None:
                    self.constants[node.output[0]] = value
        self.types: dict[str, int] = {} if outer is None else dict(outer.types)
        self.shapes: dict[str, tuple] = {} if outer is None else dict(outer.shapes)
        for info in [*g.value_info, *g.input, *g.output]:
            if info.type.HasField("tensor_type"):
                self.types[info.name] = info.type.tensor_type.elem_type
                if info.type.tensor_type.HasField("shape"):
                    dims = info.type.tensor_type.shape.dim
                    self.shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        for name, tensor in self.initializers.items():
            self.types[name] = tensor.data_type
        if outer is not None:  # values computed outside the body are its inputs
            local = set(self.producer) | set(self.initializers) | set(self.inputs)
            read = [t for n in self.nodes for t in n.input if t and t not in local]
            self.inputs += [t for t in dict.fromkeys(read) if t not in self.constants]

    def is_float(self, name: str) -> bool:
        """True for a float32 tensor (the only kind lowbit quantizes)."""
        return self.types.get(name) == FLOAT

    def is_constant(self, name: str) -> bool:
        return name in self.constants and name not in self.inputs

    def value(self, name: str) -> np.ndarray:
        """The value of a constant tensor (an initializer or the output of a Constant node)."""
        return numpy_helper.to_array(self.constants[name])

    def is_activation(self, name: str) -> bool:
        """A float tensor computed at run time (or fed as a graph input): what activation ranges are for."""
        return bool(name) and self.is_float(name) and not self.is_constant(name)

    def node_name(self, node: onnx.NodeProto) -> str:
        """A node's name, or ``OpType(first output)`` for unnamed nodes, as messages and --exclude see it."""
        return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"

    def rank(self, name: str) -> int | None:
        if name in self.constants:
            return len(self.constants[name].dims)
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


class Names:
    """Fresh names in a graph: ``new(base)`` is ``base``, or ``base_1``, ``base_2``, ... past every name in use."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {t.name for t in graph.initializer} | {i.name for i in graph.input}
        for node in graph.node:
            self.used.update(node.output)
            self.used.update(node.input)
            if node.name:
                self.used.add(node.name)

    def new(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def initializer(self, base: str, array: np.ndarray, into: list[onnx.TensorProto]) -> str:
        """A new initializer named after ``base`` holding ``array``, appended to ``into``; returns its name."""
        name = self.new(base)
        into.append(numpy_helper.from_array(np.asarray(array), name))
        return name
