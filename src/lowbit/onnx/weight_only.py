"""Weight-only quantization of an ONNX model: MatMul and Gemm weights to int4/int8 codes, activations in float.

    prepare (the float model, before any weight is rounded: AWQ's scales) -> fit codes per layer (nearest, or
    GPTQ on the calibration data's second moments, pass by pass in bounded memory) -> write (MatMulNBits or
    DequantizeLinear)

Only a MatMul whose second input is a constant 2-D weight ``W`` (K, N) and a Gemm with a constant ``B`` (transB
handled, alpha folded into the weight, ``beta * C`` kept as MatMulNBits' bias or an Add) are rewritten; every other
op stays as it is. Each weight is cut along K into blocks of ``group_size`` (or one scale per output channel);
per block (:func:`fit`):

    symmetric:  s = max|w| / (2^(b-1) - 1),  q = clip(round(w / s), -2^(b-1), 2^(b-1) - 1)
    asymmetric: s = (max(w, 0) - min(w, 0)) / (2^b - 1),  z = clip(round(-min(w, 0) / s), 0, 2^b - 1),
                q = clip(round(w / s) + z, 0, 2^b - 1)

and ``w ~ s (q - z)``. MatMulNBits stores symmetric codes shifted by ``2^(b-1)`` with no zero-point input (its
default zero point), TensorRT's blocked int4 keeps them signed (:mod:`lowbit.onnx.matmulnbits`).

GPTQ (:mod:`lowbit.core.gptq`) chooses the codes for the least output error ``tr(ΔW H ΔW^T)``, ``H = E[x x^T]``
of the layer's input: without act-order with each group's scale fitted as the rounding reaches it
(``round_groups``), with act-order at the blocks' nearest-rounding scales (static groups: MatMulNBits' default
kernel has no column permutation, so the codes stay in natural column order).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper
from tqdm.auto import tqdm

from lowbit.core import QuantSpec, dequantize, qparams, quantize, weight_range
from lowbit.core.gptq import ROWS_PER_COLUMN, round_groups, round_matrix
from lowbit.onnx import gptq, smoothing
from lowbit.onnx.graph import Graph, Names, attributes
from lowbit.onnx.matmulnbits import (
    DOMAIN,
    Blocks,
    dequantize_initializers,
    matmulnbits_initializers,
    matmulnbits_node,
)
from lowbit.onnx.model import upgrade_opset
from lowbit.onnx.placement import exclusion
from lowbit.onnx.settings import Settings, WeightOnly

DEQUANTIZE_OPSET = 21  # blocked DequantizeLinear and int4 initializers


@dataclass(frozen=True)
class Linear:
    """A MatMul or Gemm whose weight can be quantized: ``x`` its input, ``weight`` the constant, ``bias`` Gemm's
    constant C (times beta) or None."""

    node: onnx.NodeProto
    x: str
    weight: str
    trans_b: bool
    alpha: float
    bias: np.ndarray | None

    def matrix(self, graph: Graph) -> np.ndarray:
        """The weight as (N, K) float64: a row per output, alpha folded in."""
        w = graph.value(self.weight).astype(np.float64) * self.alpha
        return w if self.trans_b else w.T

    def layer(self, graph: Graph) -> gptq.Layer:
        """The layer as :mod:`lowbit.onnx.gptq` gathers its input rows."""
        return gptq.Layer(self.node, self.x, self.weight, None, tuple(graph.value(self.weight).shape))


def describe(wo: WeightOnly, accuracy_level: int = 0) -> str:
    """The layout in words: ``int4 symmetric, blocks of 128, MatMulNBits (accuracy_level 0)``."""
    grid = "per output channel" if wo.group_size is None else f"blocks of {wo.group_size}"
    kind = ("symmetric" if wo.symmetric else "asymmetric") + (f" {wo.method} ranges" if wo.method != "minmax" else "")
    where = f"MatMulNBits (accuracy_level {accuracy_level})" if wo.layout == "matmulnbits" else "DequantizeLinear"
    return f"int{wo.bits} {kind}, {grid}, {where}"


def prepare(
    model: onnx.ModelProto,
    wo: WeightOnly,
    feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None,
    *,
    total: int | None = None,
    progress: bool = True,
    only: Collection[str] | None = None,
) -> tuple[onnx.ModelProto, smoothing.Report | None]:
    """The float model as its weights will be rounded, and what AWQ did: with ``wo.awq``, each MatMul/Gemm input
    divided per channel by AWQ's scales (folded into the op before it where that is exact) and its weight rows
    multiplied by them, the scales searched for the least output error after :func:`fake_quant`
    (:func:`lowbit.onnx.smoothing.awq`, one pass of ``feeds()``; only the inputs of the weights named in ``only``,
    when given: those that will be quantized); its float outputs are the model's. Otherwise the model as given."""
    if not wo.awq:
        return model, None
    if feeds is None:
        raise ValueError("AWQ needs calibration feeds")

    def quantize_weight(w: np.ndarray) -> np.ndarray:
        return fake_quant(w, wo)

    return smoothing.awq(model, feeds(), quantize_weight, total=total, progress=progress, only=only)


def linears(graph: Graph, settings: Settings) -> tuple[list[Linear], list[str]]:
    """The MatMul/Gemm nodes whose weights are quantized, and the names of those with a constant weight left in
    float (excluded, or a form this does not rewrite: a non-2-D or non-float32 weight, Gemm with transA or a
    (M, N) C). A MatMul of two activations has no weight and is neither."""
    excluded = exclusion(settings.exclude, settings.exclude_ops)
    out, skipped = [], []
    for node in graph.nodes:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        linear = _linear(graph, node)
        if linear is None and not (len(node.input) > 1 and graph.is_constant(node.input[1])):
            continue  # activation x activation (attention scores): no weight to quantize
        if linear is None or excluded(graph, node):
            skipped.append(graph.node_name(node))
        else:
            out.append(linear)
    return out, skipped


def _linear(graph: Graph, node: onnx.NodeProto) -> Linear | None:
    if len(node.input) < 2 or not graph.is_constant(node.input[1]) or not graph.is_float(node.input[1]):
        return None
    if graph.is_constant(node.input[0]) or graph.rank(node.input[1]) != 2:
        return None
    if node.op_type == "MatMul":
        return Linear(node, node.input[0], node.input[1], False, 1.0, None)
    attrs = attributes(node)
    if attrs.get("transA", 0):
        return None
    trans_b = bool(attrs.get("transB", 0))
    n = graph.value(node.input[1]).shape[0 if trans_b else 1]
    bias = None
    if len(node.input) > 2 and node.input[2]:
        if not graph.is_constant(node.input[2]):
            return None
        c = graph.value(node.input[2]).astype(np.float32) * np.float32(attrs.get("beta", 1.0))
        if c.size not in (1, n):  # a (M, N) C: not a bias
            return None
        bias = np.broadcast_to(c.reshape(-1), (n,)).astype(np.float32)
    return Linear(node, node.input[0], node.input[1], trans_b, float(attrs.get("alpha", 1.0)), bias)


def spec(wo: WeightOnly) -> QuantSpec:
    """The grid of the codes for a (N, K) weight: blocks along axis 1, or one scale per row."""
    return QuantSpec(bits=wo.bits, signed=wo.symmetric, symmetric=wo.symmetric, axis=0 if wo.group_size is None
                     else 1, group_size=wo.group_size)  # fmt: skip


def block_qparams(w: np.ndarray, wo: WeightOnly, s: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block (or row) of ``w`` as ``s`` lays them out, from its range by
    ``wo.method`` (min/max, or the shrunk range of least squared error).

    Symmetric MatMulNBits blocks with min/max ranges use the whole signed grid, as ONNX Runtime's own quantizer
    does: the block's value of largest magnitude ``m`` (with its sign) lands exactly on the lowest code,
    ``s = m / -2^(b-1)`` (a negative scale when ``m > 0``), so 2^b codes are used instead of the 2^b - 1 of
    ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; a value of the other sign and the same magnitude clips one step short."""
    lo, hi = weight_range(w, s, wo.method)
    scale, zero_point = qparams(lo, hi, s)
    if wo.symmetric and wo.layout == "matmulnbits" and wo.method == "minmax":  # (mse's range fits [-7, 7])
        signed = np.where(np.abs(hi) >= np.abs(lo), hi, lo)  # the extreme value, its sign kept
        scale = np.where(signed != 0, signed / s.qmin, scale).astype(np.float32)
    return scale, zero_point


def fit(w: np.ndarray, wo: WeightOnly) -> Blocks:
    """Nearest rounding of ``w`` (N, K) in blocks (see the module doc)."""
    s = spec(wo)
    scale, zero_point = block_qparams(w, wo, s)
    q = quantize(w, scale, zero_point, s)
    if wo.group_size is None:
        scale, zero_point = scale.reshape(-1, 1), zero_point.reshape(-1, 1)
    return _blocks(q, scale, zero_point, wo, w.shape[1])


def fake_quant(w: np.ndarray, wo: WeightOnly) -> np.ndarray:
    """``w`` (N, K) rounded to nearest in its blocks and dequantized: ``s (q - z)`` (what AWQ's search scores)."""
    w = np.asarray(w, np.float32)
    s = spec(wo)
    scale, zero_point = block_qparams(w, wo, s)
    return dequantize(quantize(w, scale, zero_point, s), scale, zero_point, s)


def _blocks(q, scale, zero_point, wo: WeightOnly, k: int) -> Blocks:
    """Codes as :class:`Blocks` stores them: unsigned (symmetric codes shifted by ``2^(b-1)``)."""
    shift = (1 << (wo.bits - 1)) if wo.symmetric else 0
    codes = (np.asarray(q, np.int16) + shift).astype(np.uint8)
    zp = None if wo.symmetric else np.asarray(zero_point).astype(np.uint8)
    return Blocks(codes, np.asarray(scale, np.float32), zp, wo.bits, wo.group_size or k)


def fit_gptq(w: np.ndarray, h: np.ndarray, wo: WeightOnly) -> Blocks | None:
    """GPTQ's codes of ``w`` (N, K) given ``h`` (K, K), the second moment of the layer's input (see the module
    doc); K is padded with dead columns to whole groups (their codes dropped). None when ``h`` cannot be
    inverted."""
    n, k = w.shape
    s = spec(wo)
    qmin, qmax = s.qmin, s.qmax
    if wo.group_size is None:
        scale, zero_point = block_qparams(w, wo, s)
        scale, zero_point = scale.reshape(-1, 1), zero_point.reshape(-1, 1)
        q = round_matrix(w[None], scale[None], zero_point[None].astype(np.float64), qmin, qmax, h[None],
                         act_order=wo.act_order)  # fmt: skip
        return None if q is None else _blocks(q[0], scale, zero_point, wo, k)
    g = wo.group_size
    padded = -(-k // g) * g
    wp = np.zeros((n, padded))
    wp[:, :k] = w
    hp = np.zeros((padded, padded))
    hp[:k, :k] = h
    if wo.act_order:
        scale, zero_point = block_qparams(wp, wo, s)
        per_column = np.repeat(np.arange(padded // g), g)
        q = round_matrix(wp[None], scale[None][:, :, per_column], zero_point[None][:, :, per_column].astype(
            np.float64), qmin, qmax, hp[None], act_order=True)  # fmt: skip
        return None if q is None else _blocks(q[0, :, :k], scale, zero_point, wo, k)

    rows = spec(replace(wo, group_size=None))  # one scale per row of a (rows, group_size) block

    def group_fit(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sc, zp = block_qparams(block[0], wo, rows)
        return sc.astype(np.float64).reshape(1, -1, 1), zp.astype(np.float64).reshape(1, -1, 1)

    fitted = round_groups(wp[None], g, group_fit, qmin, qmax, hp[None])
    if fitted is None:
        return None
    q, scale, zero_point = fitted
    return _blocks(q[0, :, :k], scale[0], zero_point[0], wo, k)


@dataclass
class Rounded:
    """What :func:`round_weights` did: the blocks by weight name, how many layers GPTQ rounded, in how many passes
    over the data, and the largest bytes of second moments held at once."""

    blocks: dict[str, Blocks] = field(default_factory=dict)
    gptq_layers: int = 0
    passes: int = 0
    peak_hessian_bytes: int = 0


def round_weights(
    model: onnx.ModelProto,
    layers: list[Linear],
    wo: WeightOnly,
    rounding: str,
    feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None,
    *,
    budget: int = gptq.HESSIAN_BUDGET,
    total: int | None = None,
    progress: bool = True,
) -> Rounded:
    """Every layer's :class:`Blocks`: nearest rounding, or with ``rounding="gptq"`` GPTQ's codes on the second
    moments gathered from ``feeds()`` in passes that hold at most ``budget`` bytes of them
    (:func:`lowbit.onnx.gptq.gather`). A layer GPTQ cannot round (its weight read by two layers, fewer than
    :data:`lowbit.core.gptq.ROWS_PER_COLUMN` input rows per column, ``H`` not invertible) keeps nearest codes."""
    graph = Graph(model)
    out = Rounded()
    chosen = gptq.single_readers([layer.layer(graph) for layer in layers]) if rounding == "gptq" else []
    by_node = {id(layer.node): layer for layer in layers}
    if chosen:
        passes = gptq.gather(model, chosen, feeds, budget=budget, total=total, progress=progress)
        for step in passes:
            out.passes = step.count
            out.peak_hessian_bytes = max(out.peak_hessian_bytes, step.bytes)
            for g_layer in tqdm(step.layers, desc="GPTQ rounding", unit="layer", disable=not progress, leave=False):
                linear = by_node[id(g_layer.node)]
                found = step.hessian(g_layer)
                if found is None or found[1] < ROWS_PER_COLUMN * g_layer.matrix_shape[2]:
                    continue
                blocks = fit_gptq(linear.matrix(graph), found[0][0], wo)  # a MatMul/Gemm has one group
                if blocks is not None:
                    out.blocks[linear.weight] = blocks
                    out.gptq_layers += 1
    for layer in tqdm(layers, desc="rounding weights", unit="layer", disable=not progress, leave=False):
        if layer.weight not in out.blocks:
            out.blocks[layer.weight] = fit(layer.matrix(graph), wo)
    return out


def write(model: onnx.ModelProto, layers: list[Linear], blocks: dict[str, Blocks], wo: WeightOnly,
          accuracy_level: int = 0) -> onnx.ModelProto:  # fmt: skip
    """A copy of ``model`` with each layer's weight stored as ``blocks`` says, in ``wo.layout``: a MatMulNBits
    node in place of the MatMul/Gemm, or a DequantizeLinear (opset 21) feeding a MatMul (and an Add for a bias).
    Float weights no other node reads are dropped."""
    out = onnx.ModelProto()
    out.CopyFrom(upgrade_opset(model, DEQUANTIZE_OPSET) if wo.layout == "dequantize" else model)
    g = out.graph
    names = Names(g)
    replaced = {layer.node.output[0]: layer for layer in layers}
    written: dict[str, dict[str, str]] = {}  # weight -> its stored initializers, shared by the layers reading it
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        layer = replaced.get(node.output[0]) if node.op_type in ("MatMul", "Gemm") else None
        if layer is None:
            nodes.append(node)
            continue
        stored = written.get(layer.weight)
        if stored is None:
            stored = written[layer.weight] = _store(layer.weight, blocks[layer.weight], wo, names, g.initializer)
        nodes += _nodes(layer, stored, blocks[layer.weight], wo, names, g.initializer, accuracy_level)
    del g.node[:]
    g.node.extend(nodes)
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output} | _read_in_bodies(g)
    keep = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(keep)
    if wo.layout == "matmulnbits" and not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out


def _read_in_bodies(g: onnx.GraphProto) -> set[str]:
    out: set[str] = set()
    for node in g.node:
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                out |= {i for n in body.node for i in n.input}
                out |= _read_in_bodies(body)
    return out


def _store(weight: str, blocks: Blocks, wo: WeightOnly, names: Names, into) -> dict[str, str]:
    """The initializers of one quantized weight, by role; their names."""
    if wo.layout == "matmulnbits":
        b, scales, zero_points = matmulnbits_initializers(blocks)
        stored = {"B": names.initializer(f"{weight}_q{wo.bits}", b, into),
                  "scales": names.initializer(f"{weight}_scales", scales, into)}  # fmt: skip
        if zero_points is not None:
            stored["zero_points"] = names.initializer(f"{weight}_zero_points", zero_points, into)
        return stored
    stored = {}
    for role, tensor in dequantize_initializers(blocks, per_channel=wo.group_size is None).items():
        tensor.name = names.new(f"{weight}_{'q' if role == 'x' else role}")
        into.append(tensor)
        stored[role] = tensor.name
    return stored


def _nodes(layer: Linear, stored: dict[str, str], blocks: Blocks, wo: WeightOnly, names: Names, into,
           accuracy_level: int) -> list[onnx.NodeProto]:  # fmt: skip
    """The nodes that replace ``layer`` (its output name kept)."""
    node, y = layer.node, layer.node.output[0]
    base = node.name or y
    if wo.layout == "matmulnbits":
        inputs = dict(stored)
        if layer.bias is not None:
            inputs["bias"] = names.initializer(f"{base}_bias", layer.bias, into)
        return [matmulnbits_node(names.new(f"{base}_MatMulNBits"), layer.x, y, inputs, blocks, accuracy_level)]
    w = names.new(f"{layer.weight}_dequantized")
    dq_inputs = [stored["x"], stored["scale"], *([stored["zero_point"]] if "zero_point" in stored else [])]
    attrs = {"axis": 1} if wo.group_size is None else {"axis": 0, "block_size": wo.group_size}
    out = [helper.make_node("DequantizeLinear", dq_inputs, [w], name=names.new(f"{base}_DequantizeLinear"), **attrs)]
    product = y if layer.bias is None else names.new(f"{y}_matmul")
    out.append(helper.make_node("MatMul", [layer.x, w], [product], name=names.new(f"{base}_MatMul")))
    if layer.bias is not None:
        bias = names.initializer(f"{base}_bias", layer.bias, into)
        out.append(helper.make_node("Add", [product, bias], [y], name=names.new(f"{base}_Add")))
    return out
