"""Apply a :class:`~lowbit.onnx.placement.Plan` and calibrated ranges to a model: explicit QuantizeLinear /
DequantizeLinear nodes for activations, integer initializers (+ DequantizeLinear) for weights and biases.

Naming keeps the graph's contract: a quantized tensor ``t`` is still called ``t`` after its DequantizeLinear, so
graph outputs, subgraphs and every reader see the same name; the float value the producer computed is renamed
``t_float`` and only the quantizer and the excluded (float) nodes read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from lowbit.core import QuantSpec, dequantize, fitted_qparams, pow2_ceil, qparams, quantize, weight_range
from lowbit.errors import CalibrationError, FormatError
from lowbit.onnx import controlflow, fp8
from lowbit.onnx.graph import Graph, Names
from lowbit.onnx.placement import Plan

INT32_MAX = np.iinfo(np.int32).max
BIAS_CODE_MAX = 2**30  # an int32 bias code stays within half of int32: the accumulator adds to it


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one quantized tensor (arrays: per channel along ``axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None


def activation_qparams(plan: Plan, ranges: Mapping[str, tuple[float, float]]) -> dict[str, QParams]:
    """Scale and zero point of every quantized activation (on the plan's activation grid); tensors that share a
    range share these too."""
    spec = plan.activation
    roots: dict[str, QParams] = {}
    for tensor in plan.calibrated:
        if tensor not in ranges:
            raise CalibrationError(f"no calibrated range for tensor {tensor!r}; did calibration see it?")
        lo, hi = ranges[tensor]
        scale, zp = qparams(float(lo), float(hi), spec)
        roots[tensor] = QParams(scale, zp)
    return {t: roots[root] for t, root in plan.activations.items()}


def weight_scale(
    w: np.ndarray,
    axis: int | None,
    *,
    method: str = "minmax",
    options: Mapping[str, Any] | None = None,
    floor: np.ndarray | None = None,
    bits: int = 8,
    scale_kind: str = "float",
    fmt: str = "int",
) -> np.ndarray:
    """The symmetric signed scale of a weight per channel along ``axis`` (or per tensor): ``amax / 127`` of the
    range ``method`` fits to its values (:func:`lowbit.core.weight_range`: ``minmax`` its own max|w|, ``mse``,
    ``admm`` with ``options``), raised to ``floor`` (per channel or a scalar) where it is smaller
    (:func:`weight_scale_floors`). ``scale_kind="pow2"``: the power of two that fits the weight best
    (:func:`lowbit.core.fitted_qparams`), and a floor rounded up to one. ``fmt="fp8_e4m3"`` / ``"fp8_e5m2"``:
    ``amax / 448`` / ``amax / 57344`` (:mod:`lowbit.onnx.fp8`). Every weight scale of the ONNX front end comes
    from here."""
    spec = QuantSpec(bits=bits, axis=axis, scale_kind=scale_kind, format=fmt)
    scale, _ = fitted_qparams(w, *weight_range(w, spec, method, dict(options or {})), spec)
    if floor is not None:
        floor = np.asarray(floor, np.float32).reshape(scale.shape)
        if scale_kind == "pow2":
            floor = pow2_ceil(floor).astype(np.float32)
        scale = np.maximum(scale, floor)
    return scale


def weight_qparams(
    w: np.ndarray, axis: int | None, bits: int = 8, scale: np.ndarray | None = None, fmt: str = "int"
) -> tuple[QParams, np.ndarray]:
    """Symmetric signed per-channel (or per-tensor) parameters of a weight at ``scale`` (default: its own max|w|,
    :func:`weight_scale`), and its nearest codes (integers; FP8: the uint8 bit patterns, zero point +0.0)."""
    spec = QuantSpec(bits=bits, axis=axis, format=fmt)
    scale = weight_scale(w, axis, bits=bits, fmt=fmt) if scale is None else np.asarray(scale, np.float32)
    zp = np.zeros(scale.shape, dtype=spec.dtype if fmt == "int" else np.uint8)
    return QParams(scale, zp, axis), quantize(w, scale, zp, spec)  # (scale_kind does not change the codes)


def weight_scales(
    graph: Graph,
    plan: Plan,
    floors: Mapping[str, np.ndarray] | None = None,
    method: str = "minmax",
    options: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """The scale of every weight of ``plan`` (not of its bodies), by weight name: :func:`weight_scale` with
    ``method`` and ``options``, raised to ``floors`` (:func:`weight_scale_floors`). What calibration chooses once
    and every later step (GPTQ, bias correction, the build) quantizes the weights at."""
    floors = floors or {}
    out = {}
    for name, axis in plan.weights.items():
        w = graph.value(name).astype(np.float32)
        axis = None if axis is None or w.ndim == 0 else axis
        kind, fmt = plan.activation.scale_kind, plan.activation.format  # one of each for the whole model
        out[name] = weight_scale(
            w, axis, method=method, options=options, floor=floors.get(name), scale_kind=kind, fmt=fmt
        )
    return out


def weight_scale_floors(graph: Graph, plan: Plan, act: Mapping[str, QParams]) -> dict[str, np.ndarray]:
    """The least scale each weight of ``plan`` may take so that its layer's bias fits an int32 code of at most
    :data:`BIAS_CODE_MAX` at scale ``input scale * weight scale``: per output channel (a scalar for a per-tensor
    weight), for every weight whose layer has a quantized bias. :func:`weight_scale` takes the larger of this
    floor and the weight's own scale, so where the floor is lower nothing changes.

    A channel whose weights are all but zero (a dead channel after BatchNorm folding: weights ~1e-7, bias -7)
    gets a tiny weight scale, and its bias would need a code beyond int32. Kept in float, such a bias is
    quantized by ONNX Runtime's own QDQ fusion anyway and saturates (measured on EfficientNet-Lite0: a stem bias
    of -7.07 ran as -0.02, waking a channel that ReLU6 keeps at zero in FP32). A larger scale for that channel
    costs nothing: its weights round to zero either way."""
    floors: dict[str, np.ndarray] = {}
    for bias, (x, w) in plan.biases.items():
        if x not in act or w not in plan.weights:
            continue
        b = np.abs(graph.value(bias).astype(np.float64)).reshape(-1)
        floor = b / (float(np.max(act[x].scale)) * BIAS_CODE_MAX)
        axis, shape = plan.weights[w], graph.value(w).shape
        if axis is None or not shape:
            floor = floor.max(initial=0.0)
        elif floor.size != shape[axis]:
            continue  # a bias that does not run along the weight's channels: nothing to match it with
        floors[w] = np.maximum(floors.get(w, 0.0), floor).astype(np.float32)
    return floors


def _plan_weights(
    graph: Graph,
    plan: Plan,
    codes: Mapping[str, np.ndarray] | None = None,
    scales: Mapping[str, np.ndarray] | None = None,
):
    """(name, parameters, int8 codes) of every weight of ``plan``, at its scale in ``scales`` (as
    :func:`weight_scales` returns them; a weight missing there: its own max|w|); ``codes`` (by weight name)
    replaces the nearest-rounded codes of some weights with codes chosen otherwise (GPTQ) at the same scales."""
    scales = scales or {}
    for name, axis in plan.weights.items():
        w = graph.value(name).astype(np.float32)
        axis = None if axis is None or w.ndim == 0 else axis
        p, q = weight_qparams(w, axis, scale=scales.get(name), fmt=plan.activation.format)
        if codes is not None and name in codes:
            if codes[name].shape != q.shape:
                raise ValueError(f"codes for {name!r} have shape {codes[name].shape}, the weight {q.shape}")
            q = codes[name]
        yield name, p, q


def dequantized_weights(
    model: onnx.ModelProto,
    plan: Plan,
    codes: Mapping[str, np.ndarray] | None = None,
    scales: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The value every weight of ``plan`` takes after quantization (int8 or FP8), as the quantized model computes
    it."""
    fmt = plan.activation.format
    return {
        name: dequantize(q, p.scale, p.zero_point, QuantSpec(axis=p.axis, format=fmt))
        for name, p, q in _plan_weights(Graph(model), plan, codes, scales)
    }


def insert_qdq(
    model: onnx.ModelProto,
    plan: Plan,
    ranges: Mapping[str, tuple[float, float]],
    codes: Mapping[str, np.ndarray] | None = None,
    scales: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with the quantizers of ``plan`` (ranges by tensor name): weights, int32 biases and
    elementwise constants stored as integers behind a DequantizeLinear, a QuantizeLinear/DequantizeLinear pair on
    every planned activation. ``codes`` and ``scales`` as in :func:`_plan_weights` (``scales`` by default:
    :func:`weight_scales` of this model, max|w| raised to :func:`weight_scale_floors`; pass the same scales that
    chose ``codes``). Weights inside bodies take max|w| raised to their floors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = Graph(out)
    taken = controlflow.all_names(out.graph)
    _rewrite_bodies(out, graph, plan, ranges, taken)  # first: the main graph's rewriting copies its nodes
    act = activation_qparams(plan, ranges)
    if scales is None:
        scales = weight_scales(graph, plan, weight_scale_floors(graph, plan, act))
    _apply(graph, plan, act, codes, scales, taken)
    _ensure_opset(out, fp8.OPSET if fp8.is_fp8(plan.activation.format) else 13)
    return out


def _rewrite_bodies(out: onnx.ModelProto, view: Graph, plan: Plan, ranges, taken: set[str]) -> None:
    """The quantizers of each body plan of ``plan`` written into its body (nested bodies first); weights inside
    bodies are rounded to nearest."""
    for (holder, attribute), sub in plan.bodies.items():
        inner = Graph(out, controlflow.find(view.proto, holder, attribute), outer=view)
        _rewrite_bodies(out, inner, sub, ranges, taken)
        act = activation_qparams(sub, ranges)
        _apply(inner, sub, act, None, weight_scales(inner, sub, weight_scale_floors(inner, sub, act)), taken)


def _apply(graph: Graph, plan: Plan, act, codes, scales, taken: set[str]) -> None:
    """Write ``plan`` into the graph ``graph`` indexes (the main graph or a body), in place."""
    rewrite = _Rewrite(graph.proto, graph, plan.activation.format)
    rewrite.names.used |= taken
    weights = {}
    for name, p, q in _plan_weights(graph, plan, codes, scales):
        weights[name] = p
        rewrite.dequantized_constant(name, q, p, rewrite.fmt)
    rewrite.biases(plan, act, weights)
    rewrite.elementwise_constants(plan)
    rewrite.activations(act)
    rewrite.scaled(plan.scaled, act)
    rewrite.rewire(set(plan.excluded_nodes))
    rewrite.finish()
    taken |= rewrite.names.used


class _Rewrite:
    """The new nodes and initializers of :func:`insert_qdq`, gathered, then wired into the graph."""

    def __init__(self, g: onnx.GraphProto, graph: Graph, fmt: str = "int"):
        self.g, self.graph, self.names = g, graph, Names(g)
        self.fmt = fmt  # of activations and weights: FP8 codes and zero points are stored as FLOAT8
        self.head: list[onnx.NodeProto] = []  # DequantizeLinear of constants: before every node
        self.new_inits: list[onnx.TensorProto] = []
        self.replaced: set[str] = set()
        self.pairs: dict[str, list[onnx.NodeProto]] = {}  # activation -> its Q and DQ nodes
        self.float_of: dict[str, str] = {}  # what excluded nodes read
        self.dequantized_of: dict[str, str] = {}  # what quantized readers of a graph input read
        self.folded: dict[str, onnx.NodeProto] = {}  # output of a folded Mul/Div -> the DequantizeLinear instead

    def init(self, base: str, array: np.ndarray) -> str:
        return self.names.initializer(base, array, self.new_inits)

    def dequantized_constant(self, name: str, q: np.ndarray, p: QParams, fmt: str = "int") -> None:
        """Store constant ``name`` as the codes ``q`` of format ``fmt`` (integers, or FLOAT8 for FP8) behind a
        DequantizeLinear that gives its old name."""
        inputs = [self.init(f"{name}_quantized", fp8.stored(q, fmt)), self.init(f"{name}_scale", p.scale),
                  self.init(f"{name}_zero_point", fp8.stored(p.zero_point, fmt))]  # fmt: skip
        attrs = {"axis": p.axis} if p.axis is not None and np.ndim(p.scale) > 0 else {}
        dq = self.names.new(f"{name}_DequantizeLinear")
        self.head.append(helper.make_node("DequantizeLinear", inputs, [name], name=dq, **attrs))
        self.replaced.add(name)

    def biases(self, plan: Plan, act: Mapping[str, QParams], weights: Mapping[str, QParams]) -> None:
        """int32 biases at scale ``s_x * s_w``; one too large for int32 at that scale stays float."""
        for name, (x, w) in plan.biases.items():
            b = self.graph.value(name).astype(np.float64)
            if x not in act:
                continue
            s = act[x].scale.astype(np.float64) * np.broadcast_to(weights[w].scale.astype(np.float64), b.shape)
            q = np.rint(b / s)
            if np.abs(q).max(initial=0) > INT32_MAX:
                continue
            self.dequantized_constant(
                name, q.astype(np.int32), QParams(s.astype(np.float32), np.zeros(b.shape, np.int32), 0)
            )

    def elementwise_constants(self, plan: Plan) -> None:
        """The constant operands of elementwise ops as uint8 over their own range."""
        uint8 = QuantSpec(signed=False, symmetric=False)
        for name in sorted(plan.constants - self.replaced):
            c = self.graph.value(name).astype(np.float32)
            scale, zp = qparams(float(c.min(initial=0.0)), float(c.max(initial=0.0)), uint8)
            self.dequantized_constant(name, quantize(c, scale, zp, uint8), QParams(scale, zp))

    def activations(self, act: Mapping[str, QParams]) -> None:
        """A Q/DQ pair per activation: producer -> t_float -> Q -> DQ -> t (a graph input t: t -> Q -> DQ ->
        t_dequantized); tensors that share parameters share their initializers."""
        param_names: dict[int, tuple[str, str]] = {}
        new = self.names.new
        for tensor, p in act.items():
            if id(p) not in param_names:
                param_names[id(p)] = (
                    self.init(f"{tensor}_scale", p.scale),
                    self.init(f"{tensor}_zero_point", fp8.stored(p.zero_point, self.fmt)),
                )
            scale_name, zp_name = param_names[id(p)]
            if tensor in self.graph.inputs:
                src, dst = tensor, new(f"{tensor}_dequantized")
                self.dequantized_of[tensor] = dst
            else:
                src, dst = new(f"{tensor}_float"), tensor
            self.float_of[tensor] = src
            q_out = new(f"{tensor}_quantized")
            self.pairs[tensor] = [
                helper.make_node("QuantizeLinear", [src, scale_name, zp_name], [q_out],
                                 name=new(f"{tensor}_QuantizeLinear")),
                helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [dst],
                                 name=new(f"{tensor}_DequantizeLinear")),
            ]  # fmt: skip

    def scaled(self, scaled: Mapping[str, tuple[str, float]], act: Mapping[str, QParams]) -> None:
        """A Mul/Div by a positive constant on a quantized tensor becomes a DequantizeLinear of that tensor's codes
        at its scale times the factor (the op's output name kept)."""
        for tensor, (source, factor) in scaled.items():
            p = act[source]
            scale = self.init(f"{tensor}_scale", (p.scale.astype(np.float64) * factor).astype(np.float32))
            codes = self.pairs[source][0].output[0]
            zero_point = self.pairs[source][1].input[2]
            name = self.names.new(f"{tensor}_DequantizeLinear")
            self.folded[tensor] = helper.make_node("DequantizeLinear", [codes, scale, zero_point], [tensor], name=name)

    def rewire(self, excluded: set[str]) -> None:
        """Every node in order, each followed by the pairs of its outputs; excluded nodes read the float tensors,
        quantized readers of a graph input its dequantized copy."""
        nodes: list[onnx.NodeProto] = []
        for tensor in self.dequantized_of:
            nodes.extend(self.pairs[tensor])
        for node in self.g.node:
            if node.op_type == "Constant" and node.output[0] in self.replaced:
                continue
            if node.output and node.output[0] in self.folded:
                nodes.append(self.folded[node.output[0]])
                continue
            reads_float = self.graph.node_name(node) in excluded
            for i, name in enumerate(node.input):
                if reads_float and name in self.float_of:
                    node.input[i] = self.float_of[name]
                elif not reads_float and name in self.dequantized_of:
                    node.input[i] = self.dequantized_of[name]
            follow: list[onnx.NodeProto] = []
            for i, name in enumerate(node.output):
                if name in self.float_of and name not in self.dequantized_of:
                    node.output[i] = self.float_of[name]
                    follow.extend(self.pairs[name])
            nodes.append(node)
            nodes.extend(follow)
        del self.g.node[:]
        self.g.node.extend(self.head + nodes)

    def finish(self) -> None:
        """Replace the stored constants' initializers (and their listing as graph inputs, in old models)."""
        g = self.g
        kept = [t for t in g.initializer if t.name not in self.replaced]
        del g.initializer[:]
        g.initializer.extend(kept + self.new_inits)
        inputs = [i for i in g.input if i.name not in self.replaced]
        del g.input[:]
        g.input.extend(inputs)


def without_dead_quantizers(model: onnx.ModelProto) -> int:
    """Remove, in place, the DequantizeLinear nodes of ``model``'s main graph whose output nothing reads (a folded
    Mul/Div reads the codes before them; an excluded node the float tensor), then the QuantizeLinear nodes whose
    codes nothing reads any more: ONNX Runtime would run them. Returns how many nodes went. (Models built for
    measuring keep them: a tensor they expose as an output must exist.)"""
    g = model.graph
    graph = Graph(model)
    outside = {o.name for o in g.output} | graph.subgraph_reads
    readers = {t: len(c) for t, c in graph.consumers.items()}
    dead: set[int] = set()
    for op in ("DequantizeLinear", "QuantizeLinear"):
        for node in reversed(g.node):
            out = node.output[0]
            if node.op_type == op and out not in outside and not readers.get(out):
                dead.add(id(node))
                for t in node.input:
                    readers[t] -= 1
    kept = [n for n in g.node if id(n) not in dead]
    del g.node[:]
    g.node.extend(kept)
    return len(dead)


def _ensure_opset(model: onnx.ModelProto, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            if op.version < version:
                raise FormatError(f"the model's opset {op.version} is below {version}; convert it first")
            return
    model.opset_import.append(helper.make_opsetid("", version))
