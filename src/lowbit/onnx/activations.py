"""Decomposed activations rewritten as the one ONNX op that computes them, before anything is placed.

Exporters often write an activation as a chain of elementwise ops: Paddle2ONNX's hard-swish is
``x * Clip(x + 3, 0, 6) / 6``, PyTorch's at opsets below 14 ``x * HardSigmoid(x)``, a GELU
``0.5 * x * (1 + Erf(x / sqrt 2))``, a SiLU ``x * Sigmoid(x)``. Quantized, each piece costs a float kernel and the
conversions around it; the single op (``HardSwish``, ``HardSigmoid``, ``Gelu``, ...) costs one kernel between one
DequantizeLinear and one QuantizeLinear.

An activation is recognised by what it computes, not by how it is spelled: every function of one tensor in the graph
(:func:`lowbit.onnx.pointwise.regions`) is evaluated on 4,000 values from -64 to 64 (and at +-1e4), and replaced by
the first registered activation that matches it there within 1e-5 (relative, and absolute near 0) and that the
model's opset has. The rewritten model computes the same function up to float rounding. Registering an activation
is one :func:`register` call: its op, the opset it needs, and how to read its attributes off the function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from lowbit.onnx.graph import Graph, Names, attribute
from lowbit.onnx.pointwise import Region, regions, run_function
from lowbit.onnx.rules import rule_for

LOWERED = {"HardSwish": 14, "HardSigmoid": 6}  # what lower() rewrites, and the opset that has each
PROBE = np.concatenate([np.linspace(-64, 64, 4001), [-1e4, -1e3, 1e3, 1e4]]).astype(np.float32)
TOLERANCE = 1e-5
MAX_CUTS = 8  # the longest piece tried spans this many cuts


@dataclass(frozen=True)
class Activation:
    """A single ONNX op that may replace a decomposed chain. ``attributes(x, fx)`` reads its attributes off the
    chain's function (``None``: this op cannot compute it); ``opset``: the default-domain opset that has it."""

    op_type: str
    opset: int
    attributes: Callable[[np.ndarray, np.ndarray], dict | None] = lambda x, fx: {}


ACTIVATIONS: list[Activation] = []


def register(activation: Activation) -> Activation:
    ACTIVATIONS.append(activation)
    return activation


def _hard_sigmoid(x: np.ndarray, fx: np.ndarray) -> dict | None:
    """alpha and beta of ``max(0, min(1, alpha * x + beta))`` from the points where it is strictly between 0 and 1."""
    ramp = (fx > 1e-3) & (fx < 1 - 1e-3)
    if ramp.sum() < 4:
        return None
    alpha, beta = np.polyfit(x[ramp].astype(np.float64), fx[ramp].astype(np.float64), 1)
    return {"alpha": float(alpha), "beta": float(beta)} if alpha > 0 else None


register(Activation("HardSwish", 14))
register(Activation("HardSigmoid", 6, _hard_sigmoid))
register(Activation("Sigmoid", 6))
register(Activation("Gelu", 20))
register(Activation("Gelu", 20, lambda x, fx: {"approximate": "tanh"}))
register(Activation("Relu", 6))


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _matches(reference: np.ndarray, candidate: np.ndarray) -> bool:
    return bool(np.all(np.abs(candidate - reference) <= TOLERANCE * (1 + np.abs(reference))))


def _single_op(region: Region, opset: int, lowering: bool = False) -> onnx.NodeProto | None:
    """The registered activation that computes ``region``'s function, as a node, or None."""
    reference = region.evaluate(PROBE)
    if not np.all(np.isfinite(reference)):
        return None
    for act in ACTIVATIONS:
        too_new = act.opset > opset and not (lowering and act.op_type in LOWERED)
        if too_new or (len(region.nodes) == 1 and region.nodes[0].op_type == act.op_type):
            continue
        attrs = act.attributes(PROBE, reference)
        if attrs is None:
            continue
        node = helper.make_node(act.op_type, [region.source], [region.result], **attrs)
        model = helper.make_model(
            helper.make_graph(
                [node],
                "candidate",
                [helper.make_tensor_value_info(region.source, onnx.TensorProto.FLOAT, [None])],
                [helper.make_tensor_value_info(region.result, onnx.TensorProto.FLOAT, None)],
            ),
            opset_imports=[helper.make_opsetid("", max(opset, act.opset))],
        )
        if _matches(reference, run_function(model, PROBE)):
            return node
    return None


def _fusions(region: Region, opset: int, lowering: bool) -> list[tuple[Region, onnx.NodeProto]]:
    """The pieces of ``region`` (between two of its cuts) that a single op computes, each with that op; the
    longest piece from each cut on first (a hard-swish followed by a GELU is two ops, not none)."""
    cuts = [region.source, *region.cuts()]
    found, i = [], 0
    while i < len(cuts) - 1:
        for j in range(min(len(cuts) - 1, i + MAX_CUTS), i, -1):
            piece = region.segment(cuts[i], cuts[j])
            node = _single_op(piece, opset, lowering) if len(piece.nodes) > 1 else None
            if node is not None:
                found.append((piece, node))
                i = j
                break
        else:
            i += 1
    return found


def fuse(model: onnx.ModelProto, lowering: bool = False) -> dict[str, int]:
    """Rewrite, in place, every decomposed activation of ``model``'s main graph as its single op; returns how many
    chains became each op. ``lowering``: :func:`lower` runs next, so an activation it lowers is recognised even
    where the model's opset lacks its op (a hard-swish in an opset-12 model, as Paddle2ONNX writes them)."""
    graph = Graph(model)
    opset = _opset(model)
    replaced: dict[int, onnx.NodeProto] = {}  # id of a region's last node -> the op standing in for the region
    dropped: set[int] = set()
    counts: dict[str, int] = {}
    for region in regions(graph):
        for piece, node in _fusions(region, opset, lowering):
            last = next(n for n in piece.nodes if piece.result in n.output)
            node.name = last.name or f"{node.op_type}({piece.result})"
            replaced[id(last)] = node
            dropped |= {id(n) for n in piece.nodes}
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not replaced:
        return counts
    kept = [replaced.get(id(n), n) for n in model.graph.node if id(n) not in dropped or id(n) in replaced]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_unused(model, graph)
    return counts


def _drop_unused(model: onnx.ModelProto, graph: Graph) -> None:
    """Remove the initializers and value infos of the tensors the rewrite left unread."""
    g = model.graph
    read = {t for n in g.node for t in n.input} | {o.name for o in g.output} | graph.subgraph_reads
    made = {t for n in g.node for t in n.output}
    for tensor in [t for t in g.initializer if t.name not in read]:
        g.initializer.remove(tensor)
    for info in [i for i in g.value_info if i.name not in read and i.name not in made]:
        g.value_info.remove(info)


def _arrives_integer(graph: Graph, tensor: str) -> bool:
    """True when ``tensor`` comes from an op that can give integers (a compute or elementwise op), through ops
    that only move or clip values."""
    seen: set[str] = set()
    while tensor not in seen:
        seen.add(tensor)
        node = graph.producer.get(tensor)
        rule = rule_for(node) if node is not None else None
        if rule is None:
            return False
        if rule.kind in ("compute", "elementwise"):
            return True
        if rule.kind not in ("share", "activation"):
            return False
        tensor = node.input[0]
    return False


def _lowered(node: onnx.NodeProto, names: Names, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """``HardSigmoid(x) = Clip(x + beta / alpha, 0, 1 / alpha) / (1 / alpha)``; ``HardSwish(x) = x *
    HardSigmoid(x)`` with alpha 1/6 and beta 1/2. The Add is an integer kernel whose output quantizer does the
    Clip (zero point 0, range up to 1 / alpha); the Div by a constant is folded into the scale of the
    DequantizeLinear after it (:mod:`lowbit.onnx.placement`)."""
    alpha = float(attribute(node, "alpha", 0.2)) if node.op_type == "HardSigmoid" else 1 / 6
    beta = float(attribute(node, "beta", 0.5)) if node.op_type == "HardSigmoid" else 0.5
    x, y = node.input[0], node.output[0]
    base = node.name or y
    shift = names.initializer(f"{base}_shift", np.float32(beta / alpha), inits)
    zero = names.initializer(f"{base}_zero", np.float32(0), inits)
    top = names.initializer(f"{base}_top", np.float32(1 / alpha), inits)
    added, clipped = names.new(f"{base}_shifted"), names.new(f"{base}_clipped")
    nodes = [
        helper.make_node("Add", [x, shift], [added], name=names.new(f"{base}_Add")),
        helper.make_node("Clip", [added, zero, top], [clipped], name=names.new(f"{base}_Clip")),
    ]
    if node.op_type == "HardSigmoid":
        return [*nodes, helper.make_node("Div", [clipped, top], [y], name=node.name or names.new(f"{base}_Div"))]
    gate = names.new(f"{base}_gate")
    divide = helper.make_node("Div", [clipped, top], [gate], name=names.new(f"{base}_Div"))
    return [*nodes, divide, helper.make_node("Mul", [x, gate], [y], name=node.name or names.new(f"{base}_Mul"))]


def lower(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each HardSwish and HardSigmoid of ``model``'s main graph whose input can arrive as
    integers (and each whose op the model's opset lacks: :func:`fuse` put it there for this) as the ops a runtime
    without an integer kernel for them runs on integers (:func:`_lowered`); returns how many. The last node keeps
    the activation's name, so exclusions still find it."""
    graph = Graph(model)
    names = Names(model.graph)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in model.graph.node:
        if node.op_type in ("HardSwish", "HardSigmoid") and node.domain in ("", "ai.onnx"):
            unknown = LOWERED[node.op_type] > _opset(model)
            if unknown or (graph.is_float(node.input[0]) and _arrives_integer(graph, node.input[0])):
                nodes.extend(_lowered(node, names, inits))
                count += 1
                continue
        nodes.append(node)
    if count:
        made = {o for n in model.graph.node for o in n.output}
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(inits)
        shapes = {i.name: i for i in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
        for node in nodes:
            for out in node.output:
                if out not in made:  # a new tensor: float, shaped like the activation's input
                    info = onnx.ValueInfoProto()
                    if node.input[0] in shapes:
                        info.CopyFrom(shapes[node.input[0]])
                    info.name = out
                    info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
                    model.graph.value_info.append(info)
                    shapes[out] = info
    return count
