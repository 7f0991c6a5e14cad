"""Apply a :class:`~lowbit.onnx.placement.Plan` and calibrated ranges to a model: explicit QuantizeLinear /
DequantizeLinear nodes for activations, integer initializers (+ DequantizeLinear) for weights and biases.

Naming keeps the graph's contract: a quantized tensor ``t`` is still called ``t`` after its DequantizeLinear, so
graph outputs, subgraphs and every reader see the same name; the float value the producer computed is renamed
``t_float`` and only the quantizer and the excluded (float) nodes read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.core import QuantSpec, dequantize, qparams, qparams_from_tensor, quantize
from lowbit.errors import CalibrationError, FormatError
from lowbit.onnx.graph import Graph
from lowbit.onnx.placement import Plan

INT32_MAX = np.iinfo(np.int32).max
BIAS_CODE_MAX = 2**30  # an int32 bias code stays within half of int32: the accumulator adds to it


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one quantized tensor (arrays: per channel along ``axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None


class _Names:
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


def weight_qparams(
    w: np.ndarray, axis: int | None, bits: int = 8, min_scale: np.ndarray | None = None
) -> tuple[QParams, np.ndarray]:
    """Symmetric signed per-channel (or per-tensor) parameters of a weight, and its integer codes; ``min_scale``
    (per channel or a scalar) raises the scale where it is smaller (:func:`weight_scale_floors`)."""
    spec = QuantSpec(bits=bits, axis=axis)
    scale, zp = qparams_from_tensor(w, spec)
    if min_scale is not None:
        scale = np.maximum(scale, np.asarray(min_scale, np.float32).reshape(scale.shape))
    return QParams(scale, zp, axis), quantize(w, scale, zp, spec)


def weight_scale_floors(graph: Graph, plan: Plan, act: Mapping[str, QParams]) -> dict[str, np.ndarray]:
    """The least scale each weight of ``plan`` may take so that its layer's bias fits an int32 code of at most
    :data:`BIAS_CODE_MAX` at scale ``input scale * weight scale``: per output channel (a scalar for a per-tensor
    weight), for every weight whose layer has a quantized bias. :func:`weight_qparams` takes the larger of this
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
    floors: Mapping[str, np.ndarray] | None = None,
):
    """(name, parameters, int8 codes) of every weight of ``plan``; ``codes`` (by weight name) replaces the
    nearest-rounded codes of some weights with codes chosen otherwise (GPTQ) at the same scales; ``floors`` as
    :func:`weight_scale_floors` returns them."""
    floors = floors or {}
    for name, axis in plan.weights.items():
        w = graph.value(name).astype(np.float32)
        p, q = weight_qparams(w, None if axis is None or w.ndim == 0 else axis, min_scale=floors.get(name))
        if codes is not None and name in codes:
            if codes[name].shape != q.shape:
                raise ValueError(f"codes for {name!r} have shape {codes[name].shape}, the weight {q.shape}")
            q = codes[name]
        yield name, p, q


def dequantized_weights(
    model: onnx.ModelProto,
    plan: Plan,
    codes: Mapping[str, np.ndarray] | None = None,
    floors: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The value every weight of ``plan`` takes after int8 quantization, as the quantized model computes it."""
    return {
        name: dequantize(q, p.scale, p.zero_point, QuantSpec(axis=p.axis))
        for name, p, q in _plan_weights(Graph(model), plan, codes, floors)
    }


def quantize_model(
    model: onnx.ModelProto,
    plan: Plan,
    ranges: Mapping[str, tuple[float, float]],
    codes: Mapping[str, np.ndarray] | None = None,
    floors: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with the quantizers of ``plan`` (ranges by tensor name); ``codes`` and ``floors`` as
    in :func:`_plan_weights` (``floors`` by default: :func:`weight_scale_floors` of this model; pass the same
    floors that chose ``codes``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = Graph(out)
    g = out.graph
    names = _Names(g)
    act = activation_qparams(plan, ranges)
    if floors is None:
        floors = weight_scale_floors(graph, plan, act)
    weights: dict[str, QParams] = {}

    head: list[onnx.NodeProto] = []  # DequantizeLinear of constants: before every node
    new_inits: list[onnx.TensorProto] = []
    replaced: set[str] = set()

    def add_init(base: str, array: np.ndarray) -> str:
        return names.initializer(base, array, new_inits)

    def dq_constant(name: str, q: np.ndarray, p: QParams) -> None:
        inputs = [
            add_init(f"{name}_quantized", q),
            add_init(f"{name}_scale", p.scale),
            add_init(f"{name}_zero_point", p.zero_point),
        ]
        attrs = {"axis": p.axis} if p.axis is not None and np.ndim(p.scale) > 0 else {}
        node = helper.make_node("DequantizeLinear", inputs, [name], name=names.new(f"{name}_DequantizeLinear"), **attrs)
        head.append(node)
        replaced.add(name)

    for name, p, q in _plan_weights(graph, plan, codes, floors):
        weights[name] = p
        dq_constant(name, q, p)

    for name, (x, w) in plan.biases.items():
        b = graph.value(name).astype(np.float64)
        if x not in act:
            continue
        s = act[x].scale.astype(np.float64) * np.broadcast_to(weights[w].scale.astype(np.float64), b.shape)
        q = np.rint(b / s)
        if np.abs(q).max(initial=0) > INT32_MAX:
            continue  # a bias too large for int32 at this scale stays float
        dq_constant(name, q.astype(np.int32), QParams(s.astype(np.float32), np.zeros(b.shape, np.int32), 0))

    uint8 = QuantSpec(signed=False, symmetric=False)
    for name in sorted(plan.constants - replaced):
        c = graph.value(name).astype(np.float32)
        scale, zp = qparams(float(c.min(initial=0.0)), float(c.max(initial=0.0)), uint8)
        dq_constant(name, quantize(c, scale, zp, uint8), QParams(scale, zp))

    # Activations: producer -> t_float -> Q -> DQ -> t   (a graph input t: t -> Q -> DQ -> t_dequantized)
    param_names: dict[int, tuple[str, str]] = {}
    pairs: dict[str, list[onnx.NodeProto]] = {}
    float_of: dict[str, str] = {}  # what excluded nodes read
    dequantized_of: dict[str, str] = {}  # what quantized readers of a graph input read
    for tensor, p in act.items():
        if id(p) not in param_names:
            param_names[id(p)] = (add_init(f"{tensor}_scale", p.scale), add_init(f"{tensor}_zero_point", p.zero_point))
        scale_name, zp_name = param_names[id(p)]
        if tensor in graph.inputs:
            src, dst = tensor, names.new(f"{tensor}_dequantized")
            dequantized_of[tensor] = dst
        else:
            src, dst = names.new(f"{tensor}_float"), tensor
        float_of[tensor] = src
        q_out = names.new(f"{tensor}_quantized")
        pairs[tensor] = [
            helper.make_node(
                "QuantizeLinear", [src, scale_name, zp_name], [q_out], name=names.new(f"{tensor}_QuantizeLinear")
            ),
            helper.make_node(
                "DequantizeLinear", [q_out, scale_name, zp_name], [dst], name=names.new(f"{tensor}_DequantizeLinear")
            ),
        ]

    excluded = set(plan.excluded_nodes)
    nodes: list[onnx.NodeProto] = []
    for tensor in dequantized_of:
        nodes.extend(pairs[tensor])
    for node in g.node:
        if node.op_type == "Constant" and node.output[0] in replaced:
            continue
        reads_float = graph.node_name(node) in excluded
        for i, name in enumerate(node.input):
            if reads_float and name in float_of:
                node.input[i] = float_of[name]
            elif not reads_float and name in dequantized_of:
                node.input[i] = dequantized_of[name]
        follow: list[onnx.NodeProto] = []
        for i, name in enumerate(node.output):
            if name in float_of and name not in dequantized_of:
                node.output[i] = float_of[name]
                follow.extend(pairs[name])
        nodes.append(node)
        nodes.extend(follow)

    kept = [t for t in g.initializer if t.name not in replaced]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    del g.node[:]
    g.node.extend(head + nodes)
    inputs = [i for i in g.input if i.name not in replaced]  # old models list initializers as inputs too
    del g.input[:]
    g.input.extend(inputs)
    _ensure_opset(out, 13)
    return out


def _ensure_opset(model: onnx.ModelProto, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            if op.version < version:
                raise FormatError(f"the model's opset {op.version} is below {version}; convert it first")
            return
    model.opset_import.append(helper.make_opsetid("", version))
