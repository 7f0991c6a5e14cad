"""GPTQ rounding: choose each weight's integer code so that the layer's *output* error is least, not the weight's.

Rounding every weight to its nearest code minimizes ``|W_q - W|``, but what the network feels is the output error
``(W_q - W) x``. Its mean square over the data is ``tr(ΔW H ΔW^T)`` with ``H = E[x x^T]`` the second moment of the
layer's input (for a convolution: of its input patches). GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", after Optimal Brain Quantization) rounds one input column at
a time and spreads each column's rounding error over the columns not yet rounded, weighted by ``H^-1``, so that
the errors cancel on the data. The scales stay those of plain rounding (symmetric, per output channel); only the
codes change, so the model's layout and size do not.

Where it matters: a convolution whose kernel is a large-gain difference filter (an edge detector folded with its
BatchNorm) on a smooth input. Its output is a small difference of large terms; independent rounding errors add up,
while GPTQ makes them cancel on the patches the layer really sees. On EfficientNet-Lite0 the first depthwise
convolution alone costs 10 points of top-1 agreement when rounded to nearest (docs/BENCHMARKS.md).

``H`` is gathered in the calibration pass (:class:`SecondMoment`, observers beside the calibrators), from a bounded
random subset of rows (patches, tokens) of each batch, so its cost does not grow with the image size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from lowbit.core import gptq as core_gptq
from lowbit.core.gptq import DAMP, ROWS_PER_COLUMN, round_matrix
from lowbit.onnx.collect import collect
from lowbit.onnx.graph import Graph, attributes
from lowbit.onnx.placement import Plan
from lowbit.onnx.rewrite import weight_qparams

ROWS_PER_BATCH = 512  # rows of H sampled from each calibration batch (all of them when there are fewer)
# Bytes of second moments (float64 sums, columns^2 * 8 per layer input) gathered at once: past it, the layers are
# split over several passes over the calibration data (:func:`passes`), each rounded and dropped before the next,
# so any width works in bounded memory. 512 MB holds one 8,192-input H; a model whose H all fit runs one pass.
HESSIAN_BUDGET = 512 * 2**20
QMAX = 127  # codes in [-127, 127]: symmetric, as TensorRT's weights


@dataclass(frozen=True)
class Layer:
    """A layer GPTQ can round: ``x`` its float input, ``weight`` its constant weight, ``axis`` the weight's
    per-channel axis in the plan (None: per tensor)."""

    node: onnx.NodeProto
    x: str
    weight: str
    axis: int | None
    weight_shape: tuple[int, ...]

    @property
    def groups(self) -> int:
        return int(attributes(self.node).get("group", 1)) if self.node.op_type == "Conv" else 1

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight as (groups, rows, columns): a row per output unit, a column per input feature."""
        op = self.node.op_type
        if op == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        if op == "Gemm" and attributes(self.node).get("transB", 0):
            return w[None]
        return w.T[None]  # MatMul / Gemm without transB: (K, N) -> (N, K)

    def unmatrix(self, m: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`matrix`."""
        op = self.node.op_type
        if op == "Conv" or (op == "Gemm" and attributes(self.node).get("transB", 0)):
            return m.reshape(self.weight_shape)
        return m[0].T

    @property
    def matrix_shape(self) -> tuple[int, int, int]:
        """(groups, rows, columns) of :meth:`matrix`."""
        w = self.weight_shape
        if self.node.op_type == "Conv":
            return self.groups, w[0] // self.groups, int(np.prod(w[1:]))
        if self.node.op_type == "Gemm" and attributes(self.node).get("transB", 0):
            return 1, w[0], w[1]
        return 1, w[1], w[0]

    def rows(self, x: np.ndarray) -> np.ndarray:
        """The input rows a Gemm/MatMul weight multiplies, as (1, n, columns): samples of a Gemm, tokens of a
        MatMul. (A convolution's rows are patches: :func:`_patches`.)"""
        if self.node.op_type == "Gemm":
            x = x.T if attributes(self.node).get("transA", 0) else x
            return x[None]
        return x.reshape(1, -1, x.shape[-1])


def _conv_pads(node: onnx.NodeProto, spatial: tuple[int, ...], kernel, strides, dilations) -> list[tuple[int, int]]:
    attrs = attributes(node)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    n = len(spatial)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return out
    if auto == "VALID":
        return [(0, 0)] * n
    pads = list(attrs.get("pads", [0] * (2 * n)))
    return list(zip(pads[:n], pads[n:], strict=True))


def _patches(node: onnx.NodeProto, x: np.ndarray, weight_shape, groups: int, limit: int | None = None, rng=None):
    """The input patches of a convolution as (groups, n, channels-per-group * kernel taps), in the order of the
    weight's flattened (in-channel, taps) axes; at most ``limit`` random output positions. Only the picked
    patches are gathered (tap by tap), never the whole unfolded input."""
    attrs = attributes(node)
    kernel = tuple(weight_shape[2:])
    spatial = x.shape[2:]
    strides = tuple(attrs.get("strides", [1] * len(kernel)))
    dilations = tuple(attrs.get("dilations", [1] * len(kernel)))
    pads = _conv_pads(node, spatial, kernel, strides, dilations)
    out_shape = tuple(
        (size + lo + hi - (k - 1) * d - 1) // s + 1
        for size, (lo, hi), k, s, d in zip(spatial, pads, kernel, strides, dilations, strict=True)
    )
    positions = (x.shape[0], *out_shape)
    total = int(np.prod(positions))
    pick = np.arange(total) if limit is None or total <= limit else np.sort(rng.choice(total, limit, replace=False))
    n_idx, *out_idx = np.unravel_index(pick, positions)
    taps = list(np.ndindex(*kernel))
    c = x.shape[1]
    p = np.empty((len(pick), len(taps), c), x.dtype)
    gather = len(pick) * len(taps) < x.size // c
    if gather:  # few patches: gather them from the NCHW tensor as it is
        flat, plane = x.reshape(-1), int(np.prod(spatial))
        channel = np.arange(c) * plane
    else:  # many: one channels-last copy makes every gathered row contiguous
        last = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    for k, tap in enumerate(taps):
        coords = [
            o * s - lo + t * d for o, s, (lo, _), t, d in zip(out_idx, strides, pads, tap, dilations, strict=True)
        ]
        inside = np.ones(len(pick), bool)
        for co, size in zip(coords, spatial, strict=True):
            inside &= (co >= 0) & (co < size)
        clipped = [np.clip(co, 0, size - 1) for co, size in zip(coords, spatial, strict=True)]
        if gather:
            offset = n_idx * (c * plane) + np.ravel_multi_index(clipped, spatial)
            p[:, k] = flat[offset[:, None] + channel[None, :]]
        else:
            p[:, k] = last[(n_idx, *clipped)]
        p[~inside, k] = 0.0  # zero padding
    n = len(pick)
    # (n, taps, C) -> (groups, n, C/groups * taps), the order of the weight's (in-channel, taps) axes
    return np.ascontiguousarray(p.transpose(0, 2, 1).reshape(n, groups, (c // groups) * len(taps)).transpose(1, 0, 2))


def _pointwise(layer: Layer) -> bool:
    attrs = attributes(layer.node)
    n = len(layer.weight_shape) - 2
    pads = _conv_pads(layer.node, (1,) * n, layer.weight_shape[2:], [1] * n, [1] * n)
    return (
        all(k == 1 for k in layer.weight_shape[2:])
        and all(s == 1 for s in attrs.get("strides", [1] * n))
        and all(p == (0, 0) for p in pads)
    )


class SecondMoment:
    """Running ``E[r r^T]`` of a layer's input rows, per group (:class:`lowbit.core.gptq.SecondMoment`), with the
    rows sampled from each batch as the layer sees them: an observer for :func:`lowbit.onnx.collect.collect`."""

    def __init__(self, layer: Layer, rows_per_batch: int = ROWS_PER_BATCH, seed: int = 0):
        self.layer, self.limit = layer, rows_per_batch
        self.rng = np.random.default_rng(seed)
        self.moment = core_gptq.SecondMoment()

    @property
    def count(self) -> int:
        return self.moment.count

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        layer = self.layer
        if layer.node.op_type == "Conv" and _pointwise(layer):
            # A 1x1 convolution with stride 1 and no padding: its rows are pixels; one GEMM per group.
            n, c = x.shape[:2]
            pixels = x.reshape(n, c, -1)
            keep = max(1, max(self.limit, 8 * c) // n)
            if pixels.shape[2] > keep:  # the same random pixels of every image
                pixels = pixels[:, :, np.sort(self.rng.choice(pixels.shape[2], keep, replace=False))]
            t = np.ascontiguousarray(pixels.transpose(1, 0, 2)).reshape(c, -1)  # (C, rows)
            per = c // layer.groups
            self.moment.add_product(np.stack([t[i : i + per] @ t[i : i + per].T for i in range(0, c, per)]), t.shape[1])
            return
        if layer.node.op_type == "Conv":
            # H has (C/G * taps)^2 entries per group: a few times that many rows estimate it well
            columns = int(np.prod(layer.weight_shape[1:]))
            limit = min(self.limit, max(128, 8 * columns))
            r = _patches(layer.node, x, layer.weight_shape, layer.groups, limit, self.rng)
        else:
            r = layer.rows(x)
            if r.shape[1] > self.limit:
                r = r[:, self.rng.choice(r.shape[1], self.limit, replace=False)]
        self.moment.add_product(np.matmul(r.transpose(0, 2, 1), r), r.shape[1])

    @property
    def value(self) -> np.ndarray:
        return self.moment.value


def layers(graph: Graph, plan: Plan, samples: int | None = None) -> list[Layer]:
    """The quantized Conv, Gemm and MatMul nodes of ``plan`` whose weight is a constant of ``plan``: Conv and Gemm
    weights as their second input, MatMul weights as a 2-D second input (x @ W), of any width (their second
    moments are gathered in passes under a memory budget: :func:`passes`). Left out: Gemm layers with too few
    ``samples`` of calibration data (one row per sample; see :func:`codes`)."""
    quantized = set(plan.quantized_nodes)
    out = []
    for node in graph.nodes:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or graph.node_name(node) not in quantized:
            continue
        if len(node.input) < 2 or node.input[1] not in plan.weights or not graph.is_activation(node.input[0]):
            continue
        w = graph.value(node.input[1])
        if node.op_type in ("Gemm", "MatMul") and w.ndim != 2:
            continue
        if node.op_type == "Gemm" and graph.rank(node.input[0]) != 2:
            continue
        if node.op_type == "Conv" and (w.ndim < 3 or w.shape[0] % int(attributes(node).get("group", 1))):
            continue
        layer = Layer(node, node.input[0], node.input[1], plan.weights[node.input[1]], tuple(w.shape))
        columns = layer.matrix_shape[2]
        if node.op_type == "Gemm" and samples is not None and samples < ROWS_PER_COLUMN * columns:
            continue
        out.append(layer)
    return out


def _row_scales(layer: Layer, scale: np.ndarray) -> np.ndarray:
    """The weight's scale (per output channel, or a scalar) shaped (groups, rows, 1) like :meth:`Layer.matrix`."""
    g, rows, _ = layer.matrix_shape
    return np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (g * rows,)).reshape(g, rows, 1)


def round_weight(
    layer: Layer, w: np.ndarray, scale: np.ndarray, h: np.ndarray, damp: float = DAMP
) -> np.ndarray | None:
    """GPTQ's int8 codes of weight ``w`` at ``scale`` (symmetric: per output channel, or a scalar), given the
    second moment ``h`` (groups, columns, columns) of its input rows; shaped like ``w``. None when ``h`` cannot
    be inverted (:func:`lowbit.core.gptq.round_matrix`)."""
    q = round_matrix(layer.matrix(w.astype(np.float64)), _row_scales(layer, scale), 0.0, -QMAX, QMAX, h, damp)
    return None if q is None else layer.unmatrix(q).astype(np.int8)


def codes(
    graph: Graph, moments: list[SecondMoment], scales: dict[str, np.ndarray] | None = None, *, progress: bool = True
) -> dict[str, np.ndarray]:
    """GPTQ's int8 codes of every weight a :class:`SecondMoment` saw enough data for, at the weights' ``scales``
    (by weight name, as :func:`lowbit.onnx.rewrite.weight_scales` chose them; max|w| where not given). A weight
    keeps nearest rounding when it is read by two layers, or when its layer saw fewer than :data:`ROWS_PER_COLUMN`
    input rows per column (``H`` is then poorly known, and GPTQ would fit the calibration samples rather than the
    data: on MNISTNet's last layer, 128 inputs seen on 512 samples, it triples the output error)."""
    readers: dict[str, int] = {}
    for m in moments:
        readers[m.layer.weight] = readers.get(m.layer.weight, 0) + 1
    out = {}
    for m in tqdm(moments, desc="GPTQ rounding", unit="layer", disable=not progress or not moments, leave=False):
        layer = m.layer
        if readers[layer.weight] > 1 or m.moment.sum is None or m.count < ROWS_PER_COLUMN * m.moment.sum.shape[-1]:
            continue
        w = graph.value(layer.weight).astype(np.float32)
        p, _ = weight_qparams(w, layer.axis, scale=(scales or {}).get(layer.weight))
        q = round_weight(layer, w, p.scale, m.value)
        if q is not None:
            out[layer.weight] = q
    return out


def rows_key(layer: Layer) -> tuple[str, str]:
    """Layers with the same key see the same input rows, so they share one ``H``: a MatMul and a Gemm without
    transA read the rows of their input tensor as they are (a transformer's Q, K and V projections, one ``H``);
    a convolution's patches and a transposed Gemm input are the layer's own."""
    node = layer.node
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attributes(node).get("transA", 0)):
        return layer.x, ""
    return layer.x, node.output[0]


def hessian_bytes(layer: Layer) -> int:
    """Bytes of one layer's running ``sum(r r^T)``: (groups, columns, columns) float64."""
    g, _, c = layer.matrix_shape
    return 8 * g * c * c


def passes(layers: list[Layer], budget: int = HESSIAN_BUDGET) -> list[list[Layer]]:
    """``layers`` split into passes over the data whose second moments (one per :func:`rows_key`) take at most
    ``budget`` bytes together, in graph order, as few passes as that order allows; a single ``H`` larger than
    the budget gets a pass of its own (it cannot be split)."""
    out: list[list[Layer]] = []
    keys: list[set] = []
    used = 0
    for layer in layers:
        key, cost = rows_key(layer), hessian_bytes(layer)
        if out and key in keys[-1]:
            out[-1].append(layer)
            continue
        if not out or used + cost > budget:
            out.append([])
            keys.append(set())
            used = 0
        out[-1].append(layer)
        keys[-1].add(key)
        used += cost
    return out


def single_readers(layers: list[Layer]) -> list[Layer]:
    """``layers`` without those whose weight another layer also reads: one weight has one set of codes, and GPTQ
    fits codes to one layer's input (such weights keep nearest rounding)."""
    readers: dict[str, int] = {}
    for layer in layers:
        readers[layer.weight] = readers.get(layer.weight, 0) + 1
    return [layer for layer in layers if readers[layer.weight] == 1]


@dataclass
class Shared:
    """One layer's view of a :class:`SecondMoment` it shares with the layers that read the same rows (what
    :func:`codes` reads: ``layer``, ``moment``, ``count``, ``value``)."""

    layer: Layer
    source: SecondMoment

    @property
    def moment(self) -> core_gptq.SecondMoment:
        return self.source.moment

    @property
    def count(self) -> int:
        return self.source.count

    @property
    def value(self) -> np.ndarray:
        return self.source.value


@dataclass
class Pass:
    """One pass's second moments, by :func:`rows_key`; ``index`` of ``count`` passes."""

    layers: list[Layer]
    moments: dict[tuple[str, str], SecondMoment]
    index: int = 0
    count: int = 1

    @classmethod
    def start(cls, layers: list[Layer], index: int = 0, count: int = 1) -> Pass:
        """Empty second moments for ``layers``, one per :func:`rows_key`."""
        moments: dict[tuple[str, str], SecondMoment] = {}
        for layer in layers:
            moments.setdefault(rows_key(layer), SecondMoment(layer))
        return cls(layers, moments, index, count)

    def observers(self) -> list[tuple[str, SecondMoment]]:
        """``(tensor, observer)`` pairs to feed in a pass over the data."""
        return [(m.layer.x, m) for m in self.moments.values()]

    def views(self) -> list[Shared]:
        """Every layer with its second moment, as :func:`codes` takes them."""
        return [Shared(layer, self.moments[rows_key(layer)]) for layer in self.layers]

    @property
    def bytes(self) -> int:
        return sum(m.moment.sum.nbytes for m in self.moments.values() if m.moment.sum is not None)

    def hessian(self, layer: Layer) -> tuple[np.ndarray, int] | None:
        """``(H, rows seen)`` of ``layer``'s input (None: it saw no data)."""
        m = self.moments[rows_key(layer)]
        return None if m.moment.sum is None else (m.value, m.count)


def gather(
    model: onnx.ModelProto,
    layers: list[Layer],
    feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    *,
    budget: int = HESSIAN_BUDGET,
    total: int | None = None,
    progress: bool = True,
) -> Iterator[Pass]:
    """The second moments of ``layers``' inputs, pass by pass (:func:`passes`): each pass runs ``model`` over
    ``feeds()`` (a fresh iterable of feed dicts each time) and yields its :class:`Pass`; round its layers before
    asking for the next, which drops it, so at most ``budget`` bytes of ``H`` (or one larger ``H``) are held."""
    split = passes(layers, budget)
    for i, group in enumerate(split):
        step = Pass.start(group, i, len(split))
        observers: dict[str, list] = {}
        for x, m in step.observers():
            observers.setdefault(x, []).append(m)
        if len(split) > 1 and progress:
            tqdm.write(f"GPTQ second moments: pass {i + 1} of {len(split)} ({len(group)} layers)")
        collect(model, [], feeds(), method="minmax", total=total, progress=progress, observers=observers)
        yield step
