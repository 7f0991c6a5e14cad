"""Bias correction: undo the mean shift that rounding the weights puts on each output channel.

Rounding a layer's weights to int8 changes its output by ``(W_q - W) x``. Averaged over the data, that is a
systematic shift per output channel, ``(W_q - W) E[x]``, which the layers after it amplify; depthwise
convolutions, with few weights per channel, suffer most (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", section 4.2, empirical variant). The per-channel means of each layer's input
are gathered on the calibration data in the same pass as the activation ranges, and each bias is moved by
``-(W_q - W) E[x]`` before the bias is quantized. Conv (any groups, 1-D to 3-D) and Gemm are corrected; a layer
without a bias gets one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.onnx.graph import Graph, attributes
from lowbit.onnx.placement import Plan


class ChannelMean:
    """Running per-channel mean of a tensor along ``axis`` (every other axis averaged)."""

    def __init__(self, axis: int):
        self.axis, self.sum, self.count = axis, None, 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        axis = self.axis % x.ndim
        other = tuple(a for a in range(x.ndim) if a != axis)
        s = x.sum(axis=other)
        self.sum = s if self.sum is None else self.sum + s
        self.count += x.size // x.shape[axis]

    @property
    def mean(self) -> np.ndarray:
        if self.sum is None:
            raise ValueError("no data seen")
        return self.sum / self.count


@dataclass(frozen=True)
class Layer:
    """A layer whose bias can be corrected: ``x`` its input, ``axis`` the input's channel axis."""

    node: onnx.NodeProto
    x: str
    weight: str
    axis: int


def layers(graph: Graph, plan: Plan) -> list[Layer]:
    """The quantized Conv and Gemm nodes of ``plan`` with a constant, quantized weight (and a bias that is a
    constant, or none)."""
    quantized = set(plan.quantized_nodes)
    out = []
    for node in graph.nodes:
        if node.op_type not in ("Conv", "Gemm") or graph.node_name(node) not in quantized or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if w not in plan.weights or not graph.is_activation(x):
            continue
        if len(node.input) > 2 and node.input[2] and not graph.is_constant(node.input[2]):
            continue
        if node.op_type == "Gemm":
            attrs = attributes(node)
            if graph.rank(x) != 2 or attrs.get("beta", 1.0) == 0.0:
                continue
            axis = 0 if attrs.get("transA", 0) else 1
        else:
            axis = 1
        out.append(Layer(node, x, w, axis))
    return out


def shift(graph: Graph, layer: Layer, w_q: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """The mean output shift per output channel that quantizing the weight to ``w_q`` causes, given the input's
    per-channel ``mean``; None when the shapes do not fit the rule."""
    w = graph.value(layer.weight).astype(np.float64)
    delta = w_q.astype(np.float64) - w
    node = layer.node
    if node.op_type == "Conv":
        groups = int(attributes(node).get("group", 1))
        cout, cin_per_group = delta.shape[:2]
        if mean.shape != (cin_per_group * groups,) or cout % groups:
            return None
        taps = delta.reshape(cout, cin_per_group, -1).sum(axis=2)  # (cout, cin/g)
        group_of = np.arange(cout) // (cout // groups)
        return (taps * mean.reshape(groups, cin_per_group)[group_of]).sum(axis=1)
    attrs = attributes(node)
    if delta.ndim != 2:
        return None
    delta = delta if attrs.get("transB", 0) else delta.T  # (N, K)
    if mean.shape != (delta.shape[1],):
        return None
    return attrs.get("alpha", 1.0) * (delta @ mean)


def apply(model: onnx.ModelProto, shifts: Mapping[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, float]]:
    """A copy of ``model`` in which each node named in ``shifts`` has its bias moved so that its output moves by
    minus the shift (one value per output channel). Returns the model and the largest shift removed per node."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = Graph(out)
    used = {t.name for t in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
    report: dict[str, float] = {}
    replaced: set[str] = set()
    for node in graph.nodes:
        name = graph.node_name(node)
        s = shifts.get(name)
        if s is None or not np.all(np.isfinite(s)):
            continue
        if node.op_type == "Gemm":
            s = s / attributes(node).get("beta", 1.0)  # the bias C is added as beta * C
        has_bias = len(node.input) > 2 and node.input[2] != ""
        bias = graph.value(node.input[2]).astype(np.float64) if has_bias else np.zeros(s.shape)
        if bias.shape not in (s.shape, (1, *s.shape)):
            continue
        corrected = (bias - s.reshape(bias.shape)).astype(np.float32)
        new, k = f"{name}_bias_corrected", 1
        while new in used:
            new, k = f"{name}_bias_corrected_{k}", k + 1
        used.add(new)
        out.graph.initializer.append(numpy_helper.from_array(corrected, new))
        if has_bias:
            replaced.add(node.input[2])
            node.input[2] = new
        else:
            node.input.append(new)
        report[name] = float(np.abs(s).max(initial=0.0))
    still_read = {i for n in out.graph.node for i in n.input} | graph.subgraph_reads | set(graph.outputs)
    keep = [t for t in out.graph.initializer if t.name not in replaced or t.name in still_read]
    if len(keep) != len(out.graph.initializer):
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep)
    return out, report


def correct(
    model: onnx.ModelProto,
    plan: Plan,
    means: Mapping[str, np.ndarray],
    quantized_weights: Mapping[str, np.ndarray],
) -> tuple[onnx.ModelProto, dict[str, float]]:
    """A copy of ``model`` whose quantized Conv/Gemm biases are moved by minus the shift of :func:`shift`.
    ``means`` maps each layer's input to its per-channel mean, ``quantized_weights`` each weight to its
    dequantized value. Returns the model and, per corrected node, the largest shift removed."""
    graph = Graph(model)
    shifts = {}
    for layer in layers(graph, plan):
        if layer.x in means and layer.weight in quantized_weights:
            s = shift(graph, layer, quantized_weights[layer.weight], means[layer.x])
            if s is not None:
                shifts[graph.node_name(layer.node)] = s
    return apply(model, shifts)
