"""SmoothQuant and AWQ on an ONNX model: per-input-channel scales folded into the graph, outputs unchanged.

A MatMul/Gemm with a constant 2-D weight computes ``y = x W`` (W of shape (K, N)) exactly as ``y = (x / s) (s W)``
for any positive ``s`` of K values (one per input channel, ``s W`` scaling W's rows). The MatMuls that read one
tensor (q, k and v read one LayerNorm output) share one ``s``. :func:`smoothquant` and :func:`awq` choose ``s``
from one streaming pass of the data (:mod:`lowbit.core.smoothing`: SmoothQuant's
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, AWQ's ``s_j = mean|x_j|^a`` with ``a`` searched), multiply the
weights by ``s`` and fold ``1 / s`` into the op that writes the tensor where that is exact:

- a LayerNormalization over the last axis: its scale and bias divided by ``s``;
- a Mul or Div by a constant (the decomposed LayerNorm's ``* gamma``, GELU's ``* 0.5``): the constant divided
  (multiplied) by ``s``;
- an Add of a constant (the decomposed LayerNorm's ``+ beta``, a bias): the constant divided by ``s``, and the fold
  goes on into the op that writes the Add's other input;
- a MatMul/Gemm with a constant weight: its output columns (and Gemm's bias) divided by ``s``;
- attention's path back to the value projection (the input of the output projection is
  ``Reshape(Transpose(probs @ Transpose(Reshape(v))))``): through the head Reshapes and Transposes and into the
  second operand of ``probs @ v``, so ``1 / s`` lands in v's weight columns and bias;

each tensor on the way read by nothing else (a LayerNorm whose output also feeds a residual Add cannot change).
Elsewhere one ``Div(x, s)`` is inserted before the readers (a Div, which stays in float in every
target). The model returned is a new one; the input is never changed.

    smoothed, report = smoothquant(model, batches, 0.5)        # or "search": alpha per tensor on the data
    print(report.summary())
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.core import QuantSpec, fake_quant, qparams, qparams_from_tensor
from lowbit.core.smoothing import ChannelStats, Search, columns_amax, output_error, search_alpha, search_scales
from lowbit.core.smoothing import smooth_scales as core_smooth_scales
from lowbit.errors import LowbitError
from lowbit.onnx import collect
from lowbit.onnx.graph import Graph, Names, attribute

ROWS = 512  # input rows kept per tensor (a seeded, uniform sample of all rows seen) for the searches
SEED = 0

Quantizer = Callable[[np.ndarray], np.ndarray]


class SmoothingError(LowbitError, ValueError):
    """A smoothing option that is not valid (its message names the option)."""


@dataclass(frozen=True)
class Reader:
    """A MatMul/Gemm that reads ``tensor`` as its activation through a constant 2-D ``weight``; ``axis`` is the
    weight's input (K) axis: 0 for MatMul's (K, N) and Gemm's without transB, 1 for Gemm's (N, K) with it."""

    node: onnx.NodeProto
    weight: str
    axis: int

    def rows(self, graph: Graph) -> np.ndarray:
        """The weight as (outputs, K) rows, the layout :mod:`lowbit.core.smoothing` reads."""
        w = graph.value(self.weight).astype(np.float32)
        return w.T if self.axis == 0 else w


@dataclass(frozen=True)
class Site:
    """A tensor and the linear ops that read it; ``others`` is True when something else reads it too."""

    tensor: str
    readers: tuple[Reader, ...]
    others: bool


@dataclass
class Entry:
    """What smoothing did to one tensor: the method, its exponent (alpha or AWQ's a), where ``1 / s`` went, and the
    readers' output error on the sampled rows after quantization, without (``plain_error``) and with smoothing."""

    tensor: str
    readers: list[str]
    method: str
    exponent: float
    folded: str
    error: float
    plain_error: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Report:
    """One :class:`Entry` per smoothed tensor."""

    entries: list[Entry] = field(default_factory=list)

    def summary(self) -> str:
        """One line: how many tensors, where the scales went, and the mean error ratio."""
        if not self.entries:
            return "smoothing: no MatMul/Gemm with a constant weight reads a float tensor"
        kinds: dict[str, int] = {}
        for e in self.entries:
            kind = e.folded.split(" ")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        where = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        ratios = [e.error / e.plain_error for e in self.entries if e.plain_error > 0]
        ratio = f"; quantized output error x{np.mean(ratios):.2f} of unsmoothed (mean)" if ratios else ""
        return f"{self.entries[0].method}: {len(self.entries)} tensors smoothed (1/s folded into: {where}){ratio}"

    def to_dict(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.entries]


def sites(graph: Graph) -> list[Site]:
    """The float tensors of the main graph read by at least one MatMul/Gemm with a constant 2-D weight whose only
    reader is that op (a shared weight cannot be scaled for one reader), in graph order."""
    found: dict[str, list[Reader]] = {}
    for node in graph.nodes:
        reader = _reader(graph, node)
        if reader is not None:
            found.setdefault(node.input[0], []).append(reader)
    out = []
    for tensor, readers in found.items():
        others = len(graph.consumers.get(tensor, [])) > len(readers) or tensor in graph.outputs
        out.append(Site(tensor, tuple(readers), others or tensor in graph.subgraph_reads))
    return out


def _reader(graph: Graph, node: onnx.NodeProto) -> Reader | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    x, w = node.input[0], node.input[1]
    if not graph.is_activation(x) or not graph.is_constant(w) or not graph.is_float(w) or graph.rank(w) != 2:
        return None
    if len(graph.consumers.get(w, [])) != 1 or w not in graph.initializers:
        return None
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return None
        return Reader(node, w, 1 if attribute(node, "transB", 0) else 0)
    return Reader(node, w, 0)


class RowSample:
    """Per-channel statistics of every row seen and a bounded, seeded, uniform sample of the rows (reservoir
    sampling): ``update(x)`` with ``x`` of shape (..., K) takes its rows ``x.reshape(-1, K)``."""

    def __init__(self, rows: int = ROWS, seed: int = SEED):
        self.stats = ChannelStats()
        self.size = rows
        self.rng = np.random.default_rng(seed)
        self.rows: np.ndarray | None = None
        self.seen = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        rows = x.reshape(-1, x.shape[-1])
        self.stats.update(rows)
        if self.rows is None:
            self.rows = np.empty((0, rows.shape[1]), np.float32)
        room = self.size - len(self.rows)
        if room > 0:
            self.rows = np.concatenate([self.rows, rows[:room]])
        rest = rows[max(room, 0) :]
        # row i of the stream (0-based) replaces a random kept row with probability size / (i + 1)
        index = self.rng.integers(0, self.seen + max(room, 0) + np.arange(1, len(rest) + 1))
        keep = index < self.size
        self.rows[index[keep]] = rest[keep]
        self.seen += len(rows)


@dataclass(frozen=True)
class Choice:
    """Scales for one site and what they did: ``x' = x / scales``, ``W' = W * scales``."""

    scales: np.ndarray
    exponent: float
    error: float
    plain_error: float


Chooser = Callable[[list[np.ndarray], RowSample], Choice]


def int8_quantizers(activation: QuantSpec = QuantSpec(signed=False, symmetric=False), per_channel: bool = True):
    """The W8A8 fake quantizers SmoothQuant's alpha search scores with: the input per tensor at its own min/max
    on the rows (``activation``: the target's grid, re-fitted to every candidate ``x / s``), each weight matrix
    (outputs, K) as symmetric int8 per output row (``per_channel``) or per tensor, at its min/max."""
    wspec = QuantSpec(axis=0 if per_channel else None)

    def quantize_input(x: np.ndarray) -> np.ndarray:
        scale, zero = qparams(float(x.min()), float(x.max()), activation)
        return fake_quant(x, scale, zero, activation)

    def quantize_weight(w: np.ndarray) -> np.ndarray:
        scale, zero = qparams_from_tensor(w, wspec)
        return fake_quant(w, scale, zero, wspec)

    return quantize_input, quantize_weight


def smoothquant(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    alpha: float | str = 0.5,
    *,
    activation: QuantSpec = QuantSpec(signed=False, symmetric=False),
    per_channel: bool = True,
    rows: int = ROWS,
    **run: Any,
) -> tuple[onnx.ModelProto, Report]:
    """SmoothQuant (see the module doc): ``s = max|X|^alpha / max|W|^(1 - alpha)`` per input channel, ``alpha``
    a number in [0, 1] or ``"search"`` (:func:`lowbit.core.smoothing.search_alpha` per tensor, scored with the W8A8
    quantizers of :func:`int8_quantizers` for ``activation`` and ``per_channel``). ``run``: :func:`smooth`'s
    keywords (``total``, ``progress``, ``run_model``)."""
    alpha = check_alpha(alpha)
    quantize_input, quantize_weight = int8_quantizers(activation, per_channel)

    def choose(weights: list[np.ndarray], sample: RowSample) -> Choice:
        amax = sample.stats.amax
        if alpha == "search":
            found = search_alpha(weights, sample.rows, quantize_weight, quantize_input, act_amax=amax)
            return _choice(found)
        s = core_smooth_scales(amax, columns_amax(weights), alpha)
        after = output_error(weights, sample.rows, s, quantize_weight, quantize_input)
        before = output_error(weights, sample.rows, np.ones_like(s), quantize_weight, quantize_input)
        return Choice(s, alpha, after, before)

    return smooth(model, feeds, choose, "smoothquant", rows=rows, **run)


def awq(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    quantize_weight: Quantizer,
    *,
    rows: int = ROWS,
    **run: Any,
) -> tuple[onnx.ModelProto, Report]:
    """AWQ's scale search (see the module doc): ``s = mean|x|^a`` per input channel with ``a`` searched per tensor
    for the least output error of its readers after ``quantize_weight`` (the weight-only fake quantizer of a
    matrix (outputs, K), e.g. INT4 per group of 128 along K) on the sampled rows
    (:func:`lowbit.core.smoothing.search_scales`). ``run``: :func:`smooth`'s keywords."""

    def choose(weights: list[np.ndarray], sample: RowSample) -> Choice:
        return _choice(search_scales(weights, sample.rows, quantize_weight, mean_abs=sample.stats.mean_abs))

    return smooth(model, feeds, choose, "awq", rows=rows, **run)


def _choice(found: Search) -> Choice:
    exponent = 0.0 if np.isnan(found.exponent) else found.exponent
    return Choice(found.scales, exponent, found.error, found.plain_error)


def check_alpha(alpha: Any) -> float | str:
    """``alpha`` as a float in [0, 1] or ``"search"``, or a one-line :class:`SmoothingError`."""
    if isinstance(alpha, str) and alpha.strip().lower() == "search":
        return "search"
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(alpha, bool) or not 0.0 <= value <= 1.0:
        raise SmoothingError(f"smoothquant (--smoothquant) must be alpha in [0, 1] (0.5 is usual) or 'search'; "
                             f"got {alpha!r}")  # fmt: skip
    return value


def smooth(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    choose: Chooser,
    method: str,
    *,
    rows: int = ROWS,
    total: int | None = None,
    progress: bool = True,
    run_model: onnx.ModelProto | None = None,
    only: Collection[str] | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Smooth every tensor of :func:`sites` (read by a weight named in ``only``, when given: the weights that
    will be quantized) with the scales ``choose(weights, sample)`` gives (weights as (outputs,
    K) rows, the tensor's :class:`RowSample`), after one streaming pass of ``feeds`` through ``run_model`` (default:
    ``model``; a copy with a free batch dimension runs larger batches). Returns a new model and a :class:`Report`."""
    typed = _typed(model)
    graph = Graph(typed)
    found = [s for s in sites(graph) if only is None or any(r.weight in only for r in s.readers)]
    samples = {site.tensor: RowSample(rows, SEED + i) for i, site in enumerate(found)}
    if found:
        observers = {t: [s] for t, s in samples.items()}
        collect.collect(run_model or model, [], feeds, method="minmax", total=total, progress=progress,
                        observers=observers)  # fmt: skip
    out = onnx.ModelProto()
    out.CopyFrom(typed)
    editor = _Editor(out, graph)
    report = Report()
    for site in found:
        sample = samples[site.tensor]
        if sample.rows is None or not len(sample.rows):
            continue
        weights = [r.rows(graph) for r in site.readers]
        choice = choose(weights, sample)
        s = np.asarray(choice.scales, np.float32)
        for reader in site.readers:
            editor.scale(reader.node, 1, s.reshape((-1, 1) if reader.axis == 0 else (1, -1)))
        folded = _fold(graph, editor, site, s)
        names = [graph.node_name(r.node) for r in site.readers]
        report.entries.append(Entry(site.tensor, names, method, choice.exponent, folded, choice.error,
                                    choice.plain_error))  # fmt: skip
    editor.finish()
    return out, report


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the types of its intermediate tensors inferred (what tells a float activation), a copy."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes are a help here, not a need: a model ONNX cannot infer is taken as it is
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out


class _Editor:
    """Changes to the constants and nodes of ``model`` (a copy of the model ``graph`` indexes), written into it by
    :meth:`finish`. A constant read by one node changes where it is; one read by several (or held by a Constant
    node) becomes a new initializer for the node that changed it. Changes compose (a weight scaled as a reader
    and divided as the producer of another smoothed tensor gets both)."""

    def __init__(self, model: onnx.ModelProto, graph: Graph):
        self.model = model
        self.graph = graph
        self.names = Names(model.graph)
        self.values: dict[str, np.ndarray] = {}
        self.inserted: list[tuple[int, onnx.NodeProto]] = []
        self.index = {id(n): i for i, n in enumerate(graph.nodes)}

    def scale(self, node: onnx.NodeProto, index: int, factor: np.ndarray) -> None:
        """Multiply ``node``'s constant input ``index`` by ``factor`` (broadcast)."""
        mine = self.model.graph.node[self.index[id(node)]]
        name = mine.input[index]
        value = self.values[name] if name in self.values else self.graph.value(name).astype(np.float32)
        new = (value * factor).astype(np.float32)
        if name in self.values or (name in self.graph.initializers and len(self.graph.consumers[name]) == 1):
            self.values[name] = new
            return
        mine.input[index] = self.names.new(name + "_smoothed")
        self.values[mine.input[index]] = new

    def insert_div(self, site: Site, s: np.ndarray) -> None:
        """``Div(tensor, s)`` before the site's readers, placed right before the first of them, its output typed
        as the tensor is (what tells the planners it is a float activation)."""
        scale = self.names.new(site.tensor + "_smooth_scale")
        self.values[scale] = s.astype(np.float32)
        out = self.names.new(site.tensor + "_smoothed")
        div = onnx.helper.make_node("Div", [site.tensor, scale], [out], name=self.names.new(out))
        self.inserted.append((min(self.index[id(r.node)] for r in site.readers), div))
        g = self.model.graph
        info = next((v for v in [*g.value_info, *g.input, *g.output] if v.name == site.tensor), None)
        if info is not None:
            typed = onnx.ValueInfoProto()
            typed.CopyFrom(info)
            typed.name = out
            g.value_info.append(typed)
        for reader in site.readers:
            self.model.graph.node[self.index[id(reader.node)]].input[0] = out

    def finish(self) -> None:
        existing = {t.name: t for t in self.model.graph.initializer}
        for name, value in self.values.items():
            tensor = numpy_helper.from_array(value, name)
            if name in existing:
                existing[name].CopyFrom(tensor)
            else:
                self.model.graph.initializer.append(tensor)
        for index, node in sorted(self.inserted, key=lambda p: -p[0]):
            self.model.graph.node.insert(index, node)


Edit = tuple[onnx.NodeProto, int, np.ndarray]  # multiply the node's constant input by the factor


def _fold(graph: Graph, editor: _Editor, site: Site, s: np.ndarray) -> str:
    """Divide the tensor by ``s`` in the op that writes it, if that is exact (see the module doc), and say where;
    else insert a Div."""
    edits: list[Edit] = []
    if not site.others:
        where = _fold_into(graph, site.tensor, s, edits)
        if where is not None:
            for node, index, factor in edits:
                editor.scale(node, index, factor)
            return where
    # A Div, not a Mul by 1 / s: ONNX Runtime's layout runs a Mul between integer ops as QLinearMul, which would
    # round the constant 1 / s to 8 bits per tensor (channels with a small 1 / s would read as 0); a Div by a
    # vector stays in float in every target.
    editor.insert_div(site, s)
    return "inserted Div"


def _fold_into(graph: Graph, tensor: str, f: np.ndarray, edits: list[Edit]) -> str | None:
    """Record in ``edits`` the changes that divide ``tensor`` (read only by the site) by ``f`` in its producer, and
    return where; None when the producer cannot take it exactly. ``f`` broadcasts against the tensor: ``s`` along
    its last axis, or laid out per head once the fold has gone back through a Reshape or Transpose."""
    node = graph.producer.get(tensor)
    if node is None or node.domain not in ("", "ai.onnx") or node.output[0] != tensor:
        return None
    op, name = node.op_type, graph.node_name(node)
    if op in ("Reshape", "Transpose") or (op == "MatMul" and graph.is_activation(node.input[1])):
        return _fold_through(graph, node, f, edits)
    if any(d != 1 for d in f.shape[:-1]):
        return None
    s = f.reshape(-1)
    inverse = (1.0 / s).astype(np.float32)
    if op == "LayerNormalization" and attribute(node, "axis", -1) in (-1, (graph.rank(tensor) or 0) - 1):
        affine = [i for i in (1, 2) if i < len(node.input) and node.input[i]]
        if not all(_per_channel(graph, node.input[i], len(s)) for i in affine):
            return None
        edits += [(node, i, inverse) for i in affine]
        return f"LayerNormalization {name}"
    if op in ("Mul", "Div", "Add") and len(node.input) == 2:
        k = next((i for i in (1, 0) if graph.is_constant(node.input[i])), None)
        if k is None or not _per_channel(graph, node.input[k], len(s)) or (op == "Div" and k == 0):
            return None
        if op == "Add":
            other = node.input[1 - k]
            if len(graph.consumers.get(other, [])) != 1 or other in graph.outputs:
                return None
            inner = _fold_into(graph, other, s, edits)
            if inner is None:
                return None
            edits.append((node, k, inverse))
            return f"{inner} + Add {name}"
        edits.append((node, k, s if op == "Div" else inverse))
        return f"{op} {name}"
    reader = _reader(graph, node) if op in ("MatMul", "Gemm") else None
    if reader is None or graph.value(reader.weight).shape[1 - reader.axis] != len(s):
        return None
    if op == "Gemm" and len(node.input) > 2 and node.input[2]:
        if not _per_channel(graph, node.input[2], len(s)):
            return None
        edits.append((node, 2, inverse))
    edits.append((node, 1, inverse.reshape((1, -1) if reader.axis == 0 else (-1, 1))))
    return f"{op} {name}"


def _fold_through(graph: Graph, node: onnx.NodeProto, f: np.ndarray, edits: list[Edit]) -> str | None:
    """Attention's path back to the value projection: a Transpose divides its input by ``f`` transposed back; a
    Reshape that splits or merges the last two axes (heads) by ``f`` reshaped; a MatMul of two activations
    ``A @ B`` (attention . V) by dividing ``B``, when ``f`` is one value along the rows of the product."""
    op = node.op_type
    source = node.input[1] if op == "MatMul" else node.input[0]
    rank = graph.rank(node.output[0])
    if not graph.is_activation(source) or len(graph.consumers.get(source, [])) != 1 or source in graph.outputs:
        return None
    if rank is None or f.ndim > rank:
        return None
    f = f.reshape((1,) * (rank - f.ndim) + f.shape)
    if op == "Transpose":
        perm = attribute(node, "perm") or list(reversed(range(rank)))
        g = np.transpose(f, np.argsort(perm))
    elif op == "MatMul":
        g = f if rank >= 2 and f.shape[-2] == 1 and graph.rank(source) == rank else None
    else:
        g = _reshaped(graph.shapes.get(source), graph.shapes.get(node.output[0]), f)
    if g is None:
        return None
    inner = _fold_into(graph, source, g, edits)
    return None if inner is None else f"{inner} + {op} {graph.node_name(node)}"


def _reshaped(before: tuple | None, after: tuple | None, f: np.ndarray) -> np.ndarray | None:
    """``f`` (laid out for the Reshape's output ``after``) laid out for its input ``before``, when the Reshape
    only splits the last axis in two or merges the last two (the leading dimensions the same where known)."""
    if before is None or after is None or f.ndim != len(after):
        return None
    same = lambda a, b: all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))  # noqa: E731
    if len(before) == len(after) + 1 and same(before[:-2], after[:-1]):  # (..., H, d) -> (..., H * d): merge
        h, d = before[-2:]
        if h and d and h * d == after[-1] and all(x == 1 for x in f.shape[:-1]):
            return np.broadcast_to(f, (*f.shape[:-1], h * d)).reshape((1,) * (len(before) - 2) + (h, d))
    if len(before) == len(after) - 1 and same(before[:-1], after[:-2]):  # (..., H * d) -> (..., H, d): split
        h, d = after[-2:]
        if h and d and h * d == before[-1] and all(x == 1 for x in f.shape[:-2]):
            return np.broadcast_to(f, (*f.shape[:-2], h, d)).reshape((1,) * (len(before) - 1) + (h * d,))
    return None


def _per_channel(graph: Graph, name: str, k: int) -> bool:
    """A float constant that broadcasts over the last axis as one value or one per channel (shape (), (k,),
    (1, ..., k) or (1, ..., 1))."""
    if not graph.is_constant(name) or not graph.is_float(name):
        return False
    shape = graph.value(name).shape
    return all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, k))
