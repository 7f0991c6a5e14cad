"""The float remainder of a Q/DQ model in FP16: what TensorRT runs as INT8 + FP16.

Every node that is not a QuantizeLinear/DequantizeLinear computes in float16: its float constants are stored as
float16, and Cast nodes join it to the float32 world where it meets a quantizer, a graph input or output, or a
node that must stay float32 (one with a subgraph, or an input whose type the op fixes to float32, such as
Resize's scales). The quantizers keep float32 scales, as TensorRT's explicit quantization expects. Graph inputs
and outputs keep their float32 types.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.onnx.graph import Graph, Names

QDQ = ("QuantizeLinear", "DequantizeLinear")
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def _schema(node: onnx.NodeProto, opset: int):
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return None


def _follows_output_type(schema, index: int, is_input: bool) -> bool:
    """Whether the formal input/output ``index`` is typed by a type variable that float16 may take and that the
    node's outputs share (so it moves to float16 together with the node)."""
    params = schema.inputs if is_input else schema.outputs
    if not params:
        return False
    param = params[min(index, len(params) - 1)]  # variadic parameters repeat the last one
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    if param.type_str not in allowed or "tensor(float16)" not in allowed[param.type_str]:
        return False
    return not is_input or any(o.type_str == param.type_str for o in schema.outputs)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def convert(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose non-quantizer float computation runs in float16; returns it and the names of
    the nodes converted."""
    out = onnx.shape_inference.infer_shapes(model)  # a copy, with the type of every tensor
    half = _Half(out)
    converted = [half.graph.node_name(n) for n in half.nodes if id(n) in half.half_nodes]
    for node in half.nodes:
        if id(node) in half.half_nodes:
            half.convert_node(node)
    half.reorder(half.casts_back())
    return onnx.shape_inference.infer_shapes(out), converted


class _Half:
    """One pass of :func:`convert` over a model (typed by shape inference): which nodes run in float16, the
    float16 copies and Casts they need, and the Casts back to float32 for the readers that stay float32."""

    def __init__(self, out: onnx.ModelProto):
        self.opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.graph = Graph(out)
        self.g = out.graph
        self.names = Names(self.g)
        self.types = dict(self.graph.types)
        self.nodes = list(self.g.node)  # one wrapper per node for the whole pass: the sets below hold their ids
        self.half_nodes = {id(n) for n in self.nodes if self._runs_in_half(n)}
        self.initializers = {t.name: t for t in self.g.initializer}
        self.readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in self.nodes:
            for i, name in enumerate(node.input):
                self.readers.setdefault(name, []).append((node, i))
        self.half_of: dict[str, str] = {}  # float32 tensor -> its float16 copy
        self.new_nodes: dict[int, list[onnx.NodeProto]] = {}  # Cast nodes to insert before a node
        self.produced_half: dict[str, str] = {}  # original float32 output -> the float16 name the node writes

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == FLOAT

    def _runs_in_half(self, node: onnx.NodeProto) -> bool:
        schema = _schema(node, self.opset)
        if node.op_type in QDQ or node.domain not in ("", "ai.onnx") or schema is None:
            return False
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False
        if not any(self.is_float(o) for o in node.output):
            return False
        return all(_follows_output_type(schema, i, False) for i, o in enumerate(node.output) if self.is_float(o))

    def half_version(self, name: str, before: onnx.NodeProto) -> str:
        """``name`` in float16: an initializer only float16 nodes read is converted in place, anything else gets a
        Cast before ``before``."""
        if name in self.half_of:
            return self.half_of[name]
        init = self.initializers.get(name)
        only_half_readers = all(id(n) in self.half_nodes for n, _ in self.readers.get(name, []))
        if init is not None and only_half_readers and name not in self.graph.subgraph_reads:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name))
            self.half_of[name] = name
            return name
        cast = self.names.new(f"{name}_fp16")
        self.new_nodes.setdefault(id(before), []).append(
            helper.make_node("Cast", [name], [cast], self.names.new(f"{name}_to_fp16"), to=HALF)
        )
        self.half_of[name] = cast
        return cast

    def convert_node(self, node: onnx.NodeProto) -> None:
        """The node reads and writes float16 (its float attributes too: Cast(to=float), Constant(value))."""
        schema = _schema(node, self.opset)
        for i, name in enumerate(node.input):
            if not self.is_float(name) or not _follows_output_type(schema, i, True):
                continue
            node.input[i] = self.produced_half.get(name) or self.half_version(name, node)
        for i, name in enumerate(node.output):
            if self.is_float(name):
                self.produced_half[name] = node.output[i] = self.names.new(f"{name}_fp16")
        for attr in node.attribute:
            if attr.name == "to" and attr.i == FLOAT:
                attr.i = HALF
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))

    def casts_back(self) -> list[onnx.NodeProto]:
        """Float32 readers of a tensor now written in float16 (quantizers, float32 nodes, graph outputs,
        subgraphs) read it through a Cast back to float32 under its original name."""
        back = []
        for name, half in self.produced_half.items():
            needs_float = (
                name in self.graph.outputs
                or name in self.graph.subgraph_reads
                or any(id(n) not in self.half_nodes or n.input[i] != half for n, i in self.readers.get(name, []))
            )
            if needs_float:
                back.append(helper.make_node("Cast", [half], [name], self.names.new(f"{name}_to_fp32"), to=FLOAT))
        return back

    def reorder(self, back: list[onnx.NodeProto]) -> None:
        """Every node with its Casts in, before it, and Casts back, after it."""
        ordered: list[onnx.NodeProto] = []
        back_by_source = {n.input[0]: n for n in back}
        for node in self.nodes:
            ordered.extend(self.new_nodes.get(id(node), []))
            ordered.append(node)
            for o in node.output:
                if o in back_by_source:
                    ordered.append(back_by_source[o])
        ordered = [_copy(n) for n in ordered]  # detached copies: clearing the field must not touch them
        del self.g.node[:]
        self.g.node.extend(ordered)
        del self.g.value_info[:]
