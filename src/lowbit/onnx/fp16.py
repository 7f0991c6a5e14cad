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
    onnx_opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 13)
    graph = Graph(out)
    g = out.graph
    names = Names(g)
    types = dict(graph.types)
    nodes = list(g.node)  # one wrapper per node for the whole pass: the sets below hold their ids

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == FLOAT

    # Which nodes go to float16.
    half_nodes: set[int] = set()
    for node in nodes:
        schema = _schema(node, onnx_opset)
        if node.op_type in QDQ or node.domain not in ("", "ai.onnx") or schema is None:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if not any(is_float(o) for o in node.output):
            continue
        if not all(_follows_output_type(schema, i, False) for i, o in enumerate(node.output) if is_float(o)):
            continue
        half_nodes.add(id(node))

    initializers = {t.name: t for t in g.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in nodes:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))

    half_of: dict[str, str] = {}  # float32 tensor -> its float16 copy
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # Cast nodes to insert before a node

    def half_version(name: str, before: onnx.NodeProto) -> str:
        if name in half_of:
            return half_of[name]
        init = initializers.get(name)
        only_half_readers = all(id(n) in half_nodes for n, _ in readers.get(name, []))
        if init is not None and only_half_readers and name not in graph.subgraph_reads:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name))
            half_of[name] = name
            return name
        cast = names.new(f"{name}_fp16")
        new_nodes.setdefault(id(before), []).append(
            helper.make_node("Cast", [name], [cast], names.new(f"{name}_to_fp16"), to=HALF)
        )
        half_of[name] = cast
        return cast

    converted = [graph.node_name(n) for n in nodes if id(n) in half_nodes]
    produced_half: dict[str, str] = {}  # original float32 output name -> float16 name the node now writes
    for node in nodes:
        if id(node) not in half_nodes:
            continue
        schema = _schema(node, onnx_opset)
        for i, name in enumerate(node.input):
            if not is_float(name) or not _follows_output_type(schema, i, True):
                continue
            node.input[i] = produced_half.get(name) or half_version(name, node)
        for i, name in enumerate(node.output):
            if is_float(name):
                produced_half[name] = node.output[i] = names.new(f"{name}_fp16")
        for attr in node.attribute:  # Cast(to=float), Constant(value=float tensor)
            if attr.name == "to" and attr.i == FLOAT:
                attr.i = HALF
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))

    # Float32 readers of a tensor now written in float16 (quantizers, float32 nodes, graph outputs, subgraphs)
    # read it through a Cast back to float32 under its original name.
    back: list[onnx.NodeProto] = []
    for name, half in produced_half.items():
        needs_float = (
            name in graph.outputs
            or name in graph.subgraph_reads
            or any(id(n) not in half_nodes or n.input[i] != half for n, i in readers.get(name, []))
        )
        if needs_float:
            back.append(helper.make_node("Cast", [half], [name], names.new(f"{name}_to_fp32"), to=FLOAT))
    ordered: list[onnx.NodeProto] = []
    back_by_source = {n.input[0]: n for n in back}
    for node in nodes:
        ordered.extend(new_nodes.get(id(node), []))
        ordered.append(node)
        for o in node.output:
            if o in back_by_source:
                ordered.append(back_by_source[o])
    ordered = [_copy(n) for n in ordered]  # detached copies: clearing the field must not touch them
    del g.node[:]
    g.node.extend(ordered)
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(out), converted
