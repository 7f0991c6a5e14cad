"""Where the quantizers go: the plan of which tensors get a QuantizeLinear/DequantizeLinear pair, which weights are
stored as integers (and along which axis), and which biases become int32, for a target runtime.

Each target (:mod:`lowbit.recipe.targets`) names its planner, registered here in :data:`PLANNERS`:

``compute-inputs`` (target ``trt``, TensorRT explicit quantization): Q/DQ on the inputs of
Conv/ConvTranspose/Gemm/MatMul and on the skip input of a residual Add, nothing on outputs: TensorRT fuses the
rest (Conv + bias + Add + Relu, the next Q).

``integer-islands`` (target ``ort``, ONNX Runtime CPU): tensors stay integer through every op ORT runs on
integers. A Q/DQ pair goes on the inputs and outputs of compute and elementwise ops; ops that only move values
(MaxPool, Reshape, ...) share the scale of their input; Relu/Clip are absorbed by the quantizer after them (zero
point 0 clips at 0). Biases become int32 with scale s_x * s_w, as QLinearConv needs. ORT's optimizer then turns
each DQ -> op -> Q into one integer kernel. The integer domain is kept only where it pays: an elementwise op
(Add, Mul, ...) is quantized only when its inputs come from integer ops and its result reaches a compute op
(through ops that move values), and a MatMul/Gemm output only then gets a quantizer (ORT runs it as
MatMulIntegerToFloat otherwise). In a transformer, the residual Add before a LayerNormalization, the
attention-mask Add before a Softmax and the pieces of a GELU thus stay in float: quantizing them would cost
accuracy (a -10000 mask swamps the scores' range) and buy no integer kernel.

Every planner also runs inside the bodies of If, Loop and Scan nodes (:mod:`lowbit.onnx.controlflow`): a body's
plan sits in ``Plan.bodies``, and the tensors a body reads from outside are its inputs there. In ``integer-islands``
a Mul or Div by a positive constant whose input is quantized is no op at all: its readers dequantize the input's
codes at the scale times the factor (``Plan.scaled``).

``every-op`` (target ``qdq``, runtimes that fuse Q/DQ themselves): Q/DQ on every activation input of every
quantizable compute and elementwise op, weights per channel, nothing on outputs, biases left float.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from lowbit.core import QuantSpec
from lowbit.errors import LowbitError
from lowbit.onnx import controlflow
from lowbit.onnx.graph import Graph, attributes, graphs
from lowbit.onnx.rules import rule_for, scalar_factor
from lowbit.recipe import Target, get_target


@dataclass
class Plan:
    """The quantizers of one model. ``activations`` maps a tensor to the tensor whose scale it shares (itself if
    it has its own range); ``weights`` maps a constant to its per-channel axis (``None``: per tensor);
    ``biases`` maps a bias to (its input activation, its weight); ``float_readers`` are the excluded nodes, which
    read the float tensors."""

    target: str
    activation: QuantSpec = QuantSpec()  # how the activations are stored
    activations: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int | None] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)  # constant operands of elementwise ops (ort): own range
    biases: dict[str, tuple[str, str]] = field(default_factory=dict)
    # The output of a Mul/Div by a positive constant whose input is quantized -> (that input, the factor): the
    # op goes, and its readers read the input's codes at the scale times the factor.
    scaled: dict[str, tuple[str, float]] = field(default_factory=dict)
    quantized_nodes: list[str] = field(default_factory=list)
    excluded_nodes: list[str] = field(default_factory=list)
    # The plans of the bodies of If/Loop/Scan nodes, by (first output of the node, attribute): the same rules
    # inside (lowbit.onnx.controlflow)
    bodies: dict[tuple[str, str], Plan] = field(default_factory=dict)
    renamed_bodies: list[str] = field(default_factory=list)  # bodies left in float: they reuse a tensor name

    @property
    def calibrated(self) -> list[str]:
        """Tensors whose range comes from calibration (the others share one), those inside bodies included."""
        own = [t for t, root in self.activations.items() if t == root]
        return own + [t for body in self.bodies.values() for t in body.calibrated]

    def walk(self) -> list[Plan]:
        """This plan and the plans of its bodies, at any depth."""
        return [self, *(p for body in self.bodies.values() for p in body.walk())]

    def body_nodes(self) -> list[str]:
        """The quantized nodes inside bodies, at any depth."""
        return [n for body in self.bodies.values() for n in [*body.quantized_nodes, *body.body_nodes()]]

    def body_paths(self) -> list[str]:
        """Where the bodies are, at any depth, as ``node output/attribute`` paths (``loop/body``)."""
        return [f"{h}/{a}" + p for (h, a), b in self.bodies.items() for p in ["", *(f"/{q}" for q in b.body_paths())]]

    def observed(self, tensors: Collection[str]) -> Plan:
        """This plan without the bodies (at any depth) that quantize a tensor outside ``tensors``: a branch that
        never ran during calibration has no ranges, and stays in float."""
        kept = {}
        for key, body in self.bodies.items():
            body = body.observed(tensors)
            if all(t in tensors for t in body.calibrated):
                kept[key] = body
        return replace(self, bodies=kept)


class ExclusionError(LowbitError, ValueError):
    """An exclusion that is not a valid regex, or that names nothing in the model."""


def compile_pattern(pattern: str) -> re.Pattern:
    """``pattern`` compiled, or an :class:`ExclusionError` that says what is wrong with it."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ExclusionError(f"exclude (--exclude) {pattern!r} is not a valid regular expression: {exc}") from None


def check_exclusions(graph: Graph, exclude: Sequence[str], exclude_ops: Sequence[str]) -> None:
    """Refuse a regex of ``exclude`` that matches no node's name and an op type of ``exclude_ops`` that no node has:
    a typo would otherwise keep nothing in float, silently."""
    nodes = _every_node(graph.proto)  # inside If/Loop/Scan bodies too
    names = [graph.node_name(n) for n in nodes]
    for pattern in exclude:
        regex = compile_pattern(pattern)
        if not any(regex.search(name) for name in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ExclusionError(
                f"exclude (--exclude) {pattern!r} matches no node of the model (it searches node names, e.g. {sample})"
            )
    present = sorted({n.op_type for n in nodes})
    for op in exclude_ops:
        if op not in present:
            raise ExclusionError(
                f"exclude_ops (--exclude-op) {op!r}: the model has no node of that type; it has {', '.join(present)}"
            )


def _every_node(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for g in graphs(graph) for n in g.node]


def exclusion(exclude: Sequence[str], exclude_ops: Sequence[str], exclude_nodes: Collection[str] = ()):
    """A predicate ``(graph, node) -> bool``: the node's name matches a regex of ``exclude``, its op type is in
    ``exclude_ops``, or its name is one of ``exclude_nodes``."""
    patterns = [compile_pattern(p) for p in exclude]
    ops = set(exclude_ops)
    names = set(exclude_nodes)

    def excluded(graph: Graph, node: onnx.NodeProto) -> bool:
        name = graph.node_name(node)
        return node.op_type in ops or name in names or any(p.search(name) for p in patterns)

    return excluded


Planner = Callable[[Graph, list[onnx.NodeProto], "Plan", bool, Target], None]
PLANNERS: dict[str, Planner] = {}


def planner(name: str) -> Callable[[Planner], Planner]:
    """Register a placement planner: ``fn(graph, active_nodes, plan, per_channel, target)`` fills ``plan`` for the
    nodes not excluded; a target names it as its ``placement``."""

    def add(fn: Planner) -> Planner:
        PLANNERS[name] = fn
        return fn

    return add


def plan(
    graph: Graph,
    target: Target | str,
    *,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    exclude_nodes: Collection[str] = (),
    per_channel: bool = True,
    activation: QuantSpec | None = None,
) -> Plan:
    """The quantizers ``target`` (a :class:`~lowbit.recipe.Target` or its name) wants in ``graph``; nodes whose
    name matches a regex in ``exclude``, whose op type is in ``exclude_ops`` or whose name is in ``exclude_nodes``
    stay in float. ``activation``: how activations are stored (default: the target's)."""
    target = get_target(target) if isinstance(target, str) else target
    excluded = exclusion(exclude, exclude_ops, exclude_nodes)
    once = _defined_once(graph.proto)
    return _plan_graph(graph, target, excluded, per_channel, activation or target.activation, once)


def _plan_graph(graph: Graph, target: Target, excluded, per_channel: bool, activation: QuantSpec, once) -> Plan:
    """The plan of ``graph`` (the main graph or a body) and, inside it, of the bodies of its control-flow nodes
    that are not excluded and whose tensor names are defined once in the model."""
    result = Plan(target.name, activation)
    active: list[onnx.NodeProto] = []
    for node in graph.nodes:
        if rule_for(node) is None and scalar_factor(graph, node) is None:
            continue
        if excluded(graph, node):
            result.excluded_nodes.append(graph.node_name(node))
            continue
        active.append(node)
    PLANNERS[target.placement](graph, active, result, per_channel, target)
    for body in controlflow.bodies(graph.proto):
        holder = graph.producer[body.holder]
        if excluded(graph, holder):
            continue
        if not all(once(o) for n in body.graph.node for o in n.output if o):
            result.renamed_bodies.append(f"{body.holder}/{body.attribute}")
            continue
        inner = Graph(graph.model, body.graph, outer=graph)
        sub = _plan_graph(inner, target, excluded, per_channel, activation, once)
        result.excluded_nodes += sub.excluded_nodes  # reported with the model's; names are unique in it
        if sub.quantized_nodes or sub.bodies:
            result.bodies[(body.holder, body.attribute)] = sub
    return result


def _defined_once(graph: onnx.GraphProto) -> Callable[[str], bool]:
    """A test: is a tensor name defined (computed, an input or an initializer) in one place of the whole model?
    A body that reuses a name of another scope is left in float: ranges are kept by name."""
    counts: dict[str, int] = {}
    for g in graphs(graph):
        for name in [*(i.name for i in g.input), *(t.name for t in g.initializer),
                     *(o for n in g.node for o in n.output if o)]:  # fmt: skip
            counts[name] = counts.get(name, 0) + 1
    return lambda name: counts.get(name, 0) == 1


def _add_weights(graph: Graph, node: onnx.NodeProto, result: Plan, per_channel: bool) -> bool:
    """Record the constant weights of a compute node; False when it has none (a product of two activations)."""
    rule = rule_for(node)
    found = False
    for index in rule.weight_inputs:
        if index >= len(node.input):
            continue
        name = node.input[index]
        if graph.is_constant(name) and graph.is_float(name):
            result.weights.setdefault(name, rule.weight_axis(node, graph, index) if per_channel else None)
            found = True
        elif graph.is_activation(name):
            result.activations[name] = name
    return found


@planner("compute-inputs")
def _plan_trt(graph: Graph, active: list[onnx.NodeProto], result: Plan, per_channel: bool, target: Target) -> None:
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    for node in active:
        rule = rule_for(node)
        if rule is None:
            continue
        if rule.kind == "compute":
            _add_weights(graph, node, result, per_channel)
            for i in rule.activation_inputs(node):
                if graph.is_activation(node.input[i]):
                    result.activations[node.input[i]] = node.input[i]
            result.quantized_nodes.append(graph.node_name(node))
        elif node.op_type == "Add":
            skip = _residual_skip(graph, node, order)
            if skip is not None:
                result.activations[skip] = skip
                result.quantized_nodes.append(graph.node_name(node))


def _residual_skip(graph: Graph, node: onnx.NodeProto, order: dict[int, int]) -> str | None:
    """The input of a residual Add that is not fused into the Conv before it: the one to quantize."""
    inputs = [t for t in node.input if graph.is_activation(t)]
    if len(inputs) != 2:
        return None
    from_conv = [graph.producer.get(t) is not None and graph.producer[t].op_type == "Conv" for t in inputs]
    if from_conv == [True, False]:
        return inputs[1]
    if from_conv == [False, True]:
        return inputs[0]
    if from_conv == [True, True]:  # a projection shortcut: fuse the later Conv (the main branch), quantize the other
        first, second = (graph.producer[t] for t in inputs)
        return inputs[0] if order[id(first)] < order[id(second)] else inputs[1]
    return None


def _plain_bias(graph: Graph, node: onnx.NodeProto, bias: str) -> bool:
    """A bias QLinearConv/QGemm can take as int32: one value per output channel, added as is."""
    if graph.rank(bias) != 1:
        return False
    if node.op_type != "Gemm":
        return True
    attrs = attributes(node)
    return attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)


PASSING = ("share", "activation", "lookup", "scale")  # kinds an integer path runs through


def _kind(graph: Graph, node: onnx.NodeProto) -> str:
    """A node's kind for the integer-islands planner: its rule's, or ``scale`` for a Mul/Div by a positive
    constant (:func:`lowbit.onnx.rules.scalar_factor`)."""
    return "scale" if scalar_factor(graph, node) is not None else rule_for(node).kind


def _worth_integer(graph: Graph, active: list[onnx.NodeProto]) -> set[int]:
    """The ids of the active elementwise, MatMul and Gemm nodes worth keeping in the integer domain.

    An elementwise op qualifies when every activation it reads can arrive as integers (from a compute op or a
    qualifying elementwise op, through share, activation and lookup ops) and its result reaches a compute op or
    another qualifying elementwise op the same way; a MatMul/Gemm when its result reaches one. Anything else
    would add a rounding for a kernel that ends in a float op anyway (a GELU written as Erf, Mul and Add; a
    LayerNormalization; a Softmax)."""
    ids = {id(n) for n in active}
    kind = {id(n): _kind(graph, n) for n in active}

    def through(tensor: str, seen: set[str]) -> str:
        """Walk back from ``tensor`` through share/activation/lookup producers to the tensor they pass on."""
        while tensor not in seen:
            seen.add(tensor)
            node = graph.producer.get(tensor)
            if node is None or id(node) not in ids or kind[id(node)] not in PASSING:
                return tensor
            # the tensor it passes on (a Mul by a constant may hold the constant first)
            tensor = next((t for t in node.input if graph.is_activation(t)), node.input[0])
        return tensor

    arrives: set[int] = set()  # elementwise nodes whose activation inputs can all arrive as integers
    for node in active:
        if kind[id(node)] != "elementwise":
            continue
        inputs = [t for t in node.input if t and graph.is_activation(t)]
        sources = [graph.producer.get(through(t, set())) for t in inputs]
        if inputs and all(
            s is not None and id(s) in ids and (kind[id(s)] == "compute" or id(s) in arrives) for s in sources
        ):
            arrives.add(id(node))

    useful: set[int] = set()

    def reaches(tensor: str, seen: set[str]) -> bool:
        if tensor in seen:
            return False
        seen.add(tensor)
        for reader in graph.consumers.get(tensor, []):
            if id(reader) not in ids:
                continue
            k = kind[id(reader)]
            if k == "compute" or (k == "elementwise" and id(reader) in useful):
                return True
            if k in PASSING and any(reaches(o, seen) for o in reader.output if o):
                return True
        return False

    for node in reversed(active):  # graph order is topological: readers are decided before their producers
        k = kind[id(node)]
        if (k == "elementwise" and id(node) in arrives) or node.op_type in ("MatMul", "Gemm"):
            if reaches(node.output[0], set()):
                useful.add(id(node))
    return useful


@planner("integer-islands")
def _plan_ort(graph: Graph, active: list[onnx.NodeProto], result: Plan, per_channel: bool, target: Target) -> None:
    quantized_out: set[str] = set()
    followers: list[onnx.NodeProto] = []
    useful = _worth_integer(graph, active)
    for node in active:
        rule = rule_for(node)
        if _kind(graph, node) in PASSING:
            followers.append(node)
            continue
        if rule.kind == "elementwise" and id(node) not in useful:
            continue  # float inputs or a float reader: an integer kernel here would buy nothing and cost accuracy
        if rule.kind == "compute" and not _add_weights(graph, node, result, per_channel) and node.op_type != "MatMul":
            continue  # a Conv/Gemm with computed weights: leave it in float
        for i in rule.activation_inputs(node):
            name = node.input[i]
            if graph.is_activation(name):
                result.activations[name] = name
            elif rule.kind == "elementwise" and graph.is_constant(name) and graph.is_float(name):
                result.constants.add(name)
        if target.int32_biases and rule.bias_input is not None and rule.bias_input < len(node.input):
            bias = node.input[rule.bias_input]
            weight = node.input[rule.weight_inputs[0]]
            if (
                graph.is_constant(bias)
                and graph.is_float(bias)
                and weight in result.weights
                and _plain_bias(graph, node, bias)
            ):
                result.biases[bias] = (node.input[0], weight)
        out = node.output[0]
        # A MatMul/Gemm whose result feeds no integer op keeps a float output (QGemm/MatMulIntegerToFloat give
        # one); a Conv's needs a quantizer to run as QLinearConv.
        if graph.is_float(out) and not (node.op_type in ("Gemm", "MatMul") and id(node) not in useful):
            result.activations[out] = out
            quantized_out.add(out)
        result.quantized_nodes.append(graph.node_name(node))

    # Followers in graph (topological) order, so a chain Conv -> Relu -> MaxPool -> Reshape resolves in one pass.
    absorbed: set[str] = set()
    absorbing: set[int] = set()
    for node in followers:
        if _kind(graph, node) == "scale":
            _fold_scale(graph, node, result)
            continue
        rule = rule_for(node)
        source = node.input[0]
        if source not in result.activations or not graph.is_float(source):
            continue
        outputs = [o for o in node.output if o and graph.is_float(o)]
        for out in outputs:
            if rule.kind == "share":
                result.activations[out] = result.activations[source]
            else:
                result.activations[out] = out
        if rule.kind == "activation" and source in quantized_out:
            absorbed.add(source)
            absorbing.add(id(node))
        result.quantized_nodes.append(graph.node_name(node))
    # The input of an absorbed Relu needs no quantizer when the Relu is its only reader.
    for name in absorbed:
        readers = graph.consumers.get(name, [])
        if name in graph.outputs or name in graph.subgraph_reads:
            continue
        if all(id(c) in absorbing for c in readers):
            del result.activations[name]
    for name in result.scaled:  # its readers read the folded DequantizeLinear: no quantizer of its own
        result.activations.pop(name, None)


def _fold_scale(graph: Graph, node: onnx.NodeProto, result: Plan) -> None:
    """A Mul/Div by a positive constant whose input is quantized: record its output as that input's codes at a
    scale times the factor (chains of them multiply)."""
    factor = scalar_factor(graph, node)
    source = next(t for t in node.input if graph.is_activation(t))
    if source in result.scaled:
        source, first = result.scaled[source]
        factor *= first
    elif source not in result.activations:
        return
    if result.activation.scale_kind == "pow2" and not float(np.log2(factor)).is_integer():
        return  # the folded scale would not be a power of two: the op stays, in float
    result.scaled[node.output[0]] = (source, factor)
    result.quantized_nodes.append(graph.node_name(node))


@planner("every-op")
def _plan_every_op(graph: Graph, active: list[onnx.NodeProto], result: Plan, per_channel: bool, target: Target) -> None:
    """Q/DQ on the activation inputs of every compute and elementwise op; ops that only move or clip values get
    none (the runtime runs them on whatever arrives). A Conv/Gemm with computed weights stays in float."""
    for node in active:
        rule = rule_for(node)
        if rule is None or rule.kind not in ("compute", "elementwise"):
            continue
        if rule.kind == "compute" and not _add_weights(graph, node, result, per_channel) and node.op_type != "MatMul":
            continue
        for i in rule.activation_inputs(node):
            if graph.is_activation(node.input[i]):
                result.activations[node.input[i]] = node.input[i]
        result.quantized_nodes.append(graph.node_name(node))
