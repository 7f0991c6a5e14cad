"""Compute inside If, Loop and Scan bodies: weights moved into the bodies that read them, tensors inside bodies
observed during calibration, and the bodies found again in a copy of the model for rewriting.

Calibration runs a copy of the model whose bodies hand their tensors out (:func:`expose`), so every value is seen
where it was computed, with nothing approximated:

- an ``If`` branch outputs each of its tensors, and the other branch an empty tensor in its place: a tensor is
  observed on exactly the batches whose condition chose its branch (a branch that never ran during calibration
  has no ranges, and stays in float);
- a ``Loop`` or ``Scan`` body outputs each of its tensors as one more scan output: the values of every iteration,
  stacked, so the statistics (min/max, histograms) are those of all iterations together.

Nested bodies hand their tensors up one level at a time. The placement rules inside a body are the main graph's
(:func:`lowbit.onnx.placement.plan`); the tensors a body reads from the scopes around it are its inputs there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.onnx.graph import Graph, Names, graphs

BODIES = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}


@dataclass
class Body:
    """One body: the node holding it (by its first output, unique in the model), the attribute, the graph."""

    holder: str
    attribute: str
    graph: onnx.GraphProto


def bodies(graph: onnx.GraphProto) -> Iterator[Body]:
    """The bodies of the control-flow nodes of ``graph`` (not nested ones), in node order."""
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in BODIES:
            for attr in node.attribute:
                if attr.name in BODIES[node.op_type] and attr.type == onnx.AttributeProto.GRAPH:
                    yield Body(node.output[0], attr.name, attr.g)


def find(graph: onnx.GraphProto, holder: str, attribute: str) -> onnx.GraphProto:
    """The body ``attribute`` of the node of ``graph`` whose first output is ``holder``."""
    return next(b.graph for b in bodies(graph) if b.holder == holder and b.attribute == attribute)


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name of ``graph`` and of the bodies inside it."""
    names: set[str] = set()
    for g in graphs(graph):
        names |= {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
            names.add(node.name)
    names.discard("")
    return names


def _fresh(graph: onnx.GraphProto) -> Callable[[str], str]:
    """A source of names used nowhere in ``graph`` and its bodies."""
    names = Names(graph)
    names.used |= all_names(graph)
    return names.new


def localize(model: onnx.ModelProto) -> int:
    """Give every body, in place, its own copy of the constants it reads from the scopes around it (weights of a
    Conv inside an ``If`` are usually the main graph's initializers), so that a body's weights are quantized in
    the body; constants nothing reads any more are dropped. Returns how many constants were copied."""
    fresh = _fresh(model.graph)
    copied = _localize(model, model.graph, Graph(model), fresh)
    if copied:
        _drop_unread(model.graph)
    return copied


def _localize(model: onnx.ModelProto, graph: onnx.GraphProto, view: Graph, fresh: Callable[[str], str]) -> int:
    copied = 0
    for body in bodies(graph):
        inner = Graph(model, body.graph, outer=view)
        own = set(inner.initializers) | {o for n in body.graph.node for o in n.output}
        renamed: dict[str, str] = {}
        for node in body.graph.node:
            for i, name in enumerate(node.input):
                if name and name not in own and name in view.constants:
                    if name not in renamed:
                        renamed[name] = fresh(name)
                        tensor = onnx.TensorProto()
                        tensor.CopyFrom(view.constants[name])
                        tensor.name = renamed[name]
                        body.graph.initializer.append(tensor)
                    node.input[i] = renamed[name]
        copied += len(renamed)
        copied += _localize(model, body.graph, Graph(model, body.graph, outer=view), fresh)
    return copied


def _reads(graph: onnx.GraphProto) -> set[str]:
    """The names ``graph`` and the bodies inside it read (node inputs and graph outputs)."""
    return {t for g in graphs(graph) for t in [*(i for n in g.node for i in n.input), *(o.name for o in g.output)]}


def _drop_unread(graph: onnx.GraphProto) -> None:
    for g in graphs(graph):
        read = _reads(g)
        kept = [t for t in g.initializer if t.name in read]
        if len(kept) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(kept)


def expose(model: onnx.ModelProto, tensors: Sequence[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` whose outputs include every one of ``tensors`` (float32) computed in the main graph or
    inside a body, and the output name each is read from (see the module doc)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fresh = _fresh(out.graph)
    names: dict[str, str] = {}
    wanted = set(tensors)
    for body_tensor, outer in _hand_up(out.graph, wanted, fresh):
        names[body_tensor] = outer
    main = {t for n in out.graph.node for t in n.output} | {i.name for i in out.graph.input}
    names.update({t: t for t in tensors if t in main and t not in names})
    present = {o.name for o in out.graph.output}
    for o in dict.fromkeys(names.values()):
        if o not in present:
            out.graph.output.append(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None))
    return out, names


def _hand_up(graph: onnx.GraphProto, wanted: set[str], fresh: Callable[[str], str]) -> list[tuple[str, str]]:
    """Make each tensor of ``wanted`` computed inside a body of ``graph`` (at any depth) an output of the node
    holding that body in ``graph``; returns (tensor, that output's name) pairs."""
    found: list[tuple[str, str]] = []
    for node in list(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in BODIES:
            continue
        branches = {a.name: a.g for a in node.attribute if a.name in BODIES[node.op_type]}
        for name, body in branches.items():
            inner = _hand_up(body, wanted, fresh)  # nested first: their outputs are now tensors of this body
            made = {t for n in body.node for t in n.output}
            mine = [(t, t) for t in _defined(body) if t in wanted] + [(t, o) for t, o in inner]
            for tensor, local in mine:
                if local not in made or local in {o.name for o in body.output}:
                    # a body input (a Loop's carried state, a Scan's slice) or already an output: through a copy
                    copy = fresh(f"{tensor}__copy")
                    body.node.append(helper.make_node("Identity", [local], [copy]))
                    local = copy
                outer = fresh(f"{tensor}__seen")
                body.output.append(helper.make_tensor_value_info(local, onnx.TensorProto.FLOAT, None))
                for other, other_body in branches.items():  # an If's other branch hands out an empty tensor
                    if other != name:
                        _empty_output(other_body, fresh)
                node.output.append(outer)
                if node.op_type == "Scan":
                    _extend_scan_attributes(node)
                found.append((tensor, outer))
    return found


def _defined(body: onnx.GraphProto) -> list[str]:
    """The tensors a body defines: its inputs and what its nodes compute."""
    return [i.name for i in body.input] + [t for n in body.node for t in n.output if t]


def _empty_output(body: onnx.GraphProto, fresh: Callable[[str], str]) -> None:
    name = fresh("lowbit_empty")
    value = numpy_helper.from_array(np.zeros((0,), np.float32))
    body.node.append(helper.make_node("Constant", [], [name], value=value))
    body.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))


def _extend_scan_attributes(node: onnx.NodeProto) -> None:
    """One more scan output of a Scan: its per-output axis and direction lists (when given) grow by a default."""
    for attr in node.attribute:
        if attr.name in ("scan_output_axes", "scan_output_directions"):
            attr.ints.append(0)
