"""EasyQuant (Wu et al. 2020, "EasyQuant: Post-training Quantization via Scale Optimization", arXiv 2006.16669)
for ONNX models: a stage after calibration that searches the scales again, layer by layer, for the quantized layer
output closest in direction to the FP32 one.

For each Conv, Gemm and MatMul with a quantized constant weight, in graph (topological) order:

- its input ``x`` is taken from the model *as quantized so far* (every layer upstream with its refined scales,
  Q/DQ as the target places them; weights rounded to nearest and biases as they are, since GPTQ and bias
  correction run after the search), so the error that accumulates upstream is the one the search sees;
  its FP32 output ``y`` from the float model;
- alternately (``rounds`` times) the weight step chooses each output channel's weight scale and the activation
  step the scale of ``x``, each among factors of the calibrated scale in ``[1 / span, span]`` (a geometric grid of
  ``coarse`` points, then ``fine`` points between the best one's neighbours; weights scaled to their own max|w|
  only shrink, since a coarser grid clips nothing more), maximising the cosine similarity of
  the quantized layer output to ``y``: per channel for the weights (channel c's output depends on its scale alone,
  so one run of the layer per factor scores every channel), over the whole output for the activation;
- a layer whose refined cosine is below its starting scales' cosine keeps its starting scales.

Weights are rounded to nearest during the search, so their scales are searched only where the weight rounding is
nearest (the paper's setting): under GPTQ, which picks its codes for the layer's output error at max|w| scales,
scales chosen for nearest codes do harm (EfficientNet-Lite0, all INT8: top-1 agreement 92.5% with GPTQ alone,
91.4% with both steps, 91.7% with the weight step alone, 93.3% with the activation step alone). The chosen scales
then go to the weight rounding, bias correction, the ranges file and the TensorRT cache. An activation shared by
several layers is never searched (nor one a residual Add or any other node also reads: its scale is theirs too).

Cost: the search runs on at most ``samples`` calibration samples (64 by default, a few dozen as in the paper);
per layer, the quantized and the float model up to the layer's input, once each, and the layer alone once per
candidate (about 44 candidates with the defaults). Memory: the layer's input, quantized-upstream and FP32, and
its FP32 output on those samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from tqdm.auto import tqdm

from lowbit.core import QuantSpec, qparams
from lowbit.errors import CalibrationError
from lowbit.onnx import rewrite
from lowbit.onnx.calibration import Calibrated
from lowbit.onnx.collect import with_outputs
from lowbit.onnx.extract import cut
from lowbit.onnx.graph import Graph
from lowbit.onnx.model import session

KINDS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Search:
    """How EasyQuant searches (see the module doc)."""

    samples: int = 64
    rounds: int = 2
    span: float = 2.0
    coarse: int = 9
    fine: int = 6
    weights: bool | None = None  # search the weight scales too; None: only when the weight rounding is nearest

    def __post_init__(self) -> None:
        if self.weights not in (None, True, False):
            raise CalibrationError(f"easyquant: weights must be True, False or None, got {self.weights!r}")
        for name in ("samples", "rounds", "coarse", "fine"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CalibrationError(f"easyquant: {name} must be a positive integer, got {value!r}")
        if not self.span > 1.0:
            raise CalibrationError(f"easyquant: span must be above 1 (factors in [1/span, span]), got {self.span!r}")

    def coarse_factors(self) -> np.ndarray:
        """1 first (the start wins ties), then the geometric grid over [1/span, span]."""
        grid = np.geomspace(1.0 / self.span, self.span, self.coarse)
        return np.r_[1.0, grid[~np.isclose(grid, 1.0)]]

    def fine_steps(self) -> np.ndarray:
        """Factors around a point, between its neighbours on the coarse grid (1 first)."""
        step = self.span ** (2.0 / max(self.coarse - 1, 1))
        inner = np.geomspace(1.0 / step, step, self.fine + 2)[1:-1]
        return np.r_[1.0, inner[~np.isclose(inner, 1.0)]]


@dataclass
class LayerReport:
    """What the search did to one layer: its output cosine to FP32 before and after, and the factors chosen."""

    name: str
    cosine_before: float
    cosine_after: float
    activation_factor: float | None  # None: the input's scale was not searched here
    weight_factors: tuple[float, float]  # the least and the largest per-channel factor


@dataclass
class Report:
    layers: list[LayerReport] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.layers:
            return "easyquant: no layer to refine"
        before = float(np.mean([r.cosine_before for r in self.layers]))
        after = float(np.mean([r.cosine_after for r in self.layers]))
        moved = sum(r.cosine_after > r.cosine_before for r in self.layers)
        return (
            f"easyquant on {len(self.layers)} layers ({self.samples} samples, {self.seconds:.0f} s): mean layer "
            f"output cosine {before:.5f} -> {after:.5f}, {moved} layers improved"
        )

    def to_dict(self) -> dict:
        return {"samples": self.samples, "seconds": self.seconds, "layers": [r.__dict__ for r in self.layers]}


@dataclass(frozen=True)
class Layer:
    node: onnx.NodeProto
    name: str
    x: str
    weight: str
    axis: int | None  # the weight's channel axis (None: per tensor)
    out_axis: int  # the output's channel axis


def layers(graph: Graph, plan) -> list[Layer]:
    """The quantized Conv/Gemm/MatMul nodes of the main graph with a quantized constant weight as second input, in
    graph order."""
    quantized = set(plan.quantized_nodes)
    out = []
    for node in graph.nodes:
        name = graph.node_name(node)
        if node.op_type not in KINDS or name not in quantized or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if w not in plan.weights or not graph.is_activation(x):
            continue
        out_axis = 1 if node.op_type == "Conv" else -1
        out.append(Layer(node, name, x, w, plan.weights[w], out_axis))
    return out


def shared_roots(graph: Graph, plan) -> set[str]:
    """The activation ranges (by root tensor) that more than one node reads through its quantizer, not counting the
    nodes whose output shares the range: a range searched for one layer's output would move the others' (a block
    input that a residual Add also reads)."""
    readers: dict[str, int] = {}
    for node in graph.nodes:
        passes = {plan.activations.get(o) for o in node.output}  # a Flatten or MaxPool passes its range on
        for t in dict.fromkeys(node.input):
            root = plan.activations.get(t)
            if root is not None and root not in passes:
                readers[root] = readers.get(root, 0) + 1
    return {root for root, n in readers.items() if n > 1}


def _layer_model(node: onnx.NodeProto, graph: Graph, opsets) -> onnx.ModelProto:
    """The node alone, its input and its weight as inputs (the bias a constant)."""
    x, w = node.input[0], node.input[1]
    inputs = [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in (x, w)]
    inits = [onnx.numpy_helper.from_array(graph.value(t).astype(np.float32), t) for t in node.input[2:] if t]
    out = helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)
    g = helper.make_graph([node], "layer", inputs, [out], inits)
    return helper.make_model(g, opset_imports=list(opsets))


def _scoring_model(layer: Layer, graph: Graph, opsets, rank: int, act: QuantSpec | None) -> onnx.ModelProto:
    """The layer with its input quantized at a given scale and zero point (``act``: its grid; None: not quantized)
    and its weight at given scales, outputting per output channel <y, y_ref> and <y, y>: ONNX Runtime's own
    Q/DQ (what the deployed model computes) and no output ever copied out."""
    node = layer.node
    f32 = onnx.TensorProto.FLOAT
    w = graph.value(layer.weight).astype(np.float32)
    scale_shape = [] if layer.axis is None else [w.shape[layer.axis]]
    axis = {} if layer.axis is None else {"axis": layer.axis}
    inits = [
        onnx.numpy_helper.from_array(w, "w"),
        onnx.numpy_helper.from_array(np.zeros(scale_shape, np.int8), "w_zero_point"),
        *(
            onnx.numpy_helper.from_array(graph.value(t).astype(np.float32), f"b{i}")
            for i, t in enumerate(node.input[2:])
            if t
        ),
    ]
    inputs = [helper.make_tensor_value_info(n, f32, None) for n in ("x", "y_ref")]
    inputs.append(helper.make_tensor_value_info("w_scale", f32, scale_shape))
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zero_point"], ["w_q"], **axis),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero_point"], ["w_dq"], **axis),
    ]
    x = "x"
    if act is not None:
        zp_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(act.dtype))
        inputs += [
            helper.make_tensor_value_info("x_scale", f32, []),
            helper.make_tensor_value_info("x_zp", zp_type, []),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        ]
        x = "x_dq"
    bias = [f"b{i}" if t else "" for i, t in enumerate(node.input[2:])]
    copy = helper.make_node(node.op_type, [x, "w_dq", *bias], ["y"], domain=node.domain)
    copy.attribute.extend(node.attribute)
    out_axis = layer.out_axis % rank
    others = onnx.numpy_helper.from_array(np.array([a for a in range(rank) if a != out_axis], np.int64), "others")
    inits.append(others)
    nodes += [
        copy,
        helper.make_node("Mul", ["y", "y_ref"], ["prod"]),
        helper.make_node("Mul", ["y", "y"], ["square"]),
        helper.make_node("ReduceSum", ["prod", "others"], ["dot"], keepdims=0),
        helper.make_node("ReduceSum", ["square", "others"], ["norm"], keepdims=0),
    ]
    outputs = [helper.make_tensor_value_info(n, f32, None) for n in ("dot", "norm")]
    g = helper.make_graph(nodes, "score", inputs, outputs, inits)
    version = max([o.version for o in opsets if o.domain in ("", "ai.onnx")] + [13])
    return helper.make_model(g, opset_imports=[helper.make_operatorsetid("", version)])


def _values(model: onnx.ModelProto, tensor: str, feeds: list[dict]) -> list[np.ndarray]:
    """``tensor``'s value on each feed dict, from ``model`` cut down to what computes it."""
    names = {i.name for i in model.graph.input}
    if tensor in names:
        return [np.asarray(f[tensor], np.float32) for f in feeds]
    sub = cut(model, [i.name for i in model.graph.input], [tensor])
    sess = session(with_outputs(sub, [tensor]))
    wanted = {i.name for i in sess.get_inputs()}
    return [sess.run([tensor], {k: v for k, v in f.items() if k in wanted})[0] for f in feeds]


def pre_quantizer(model: onnx.ModelProto, tensor: str) -> str:
    """The float tensor the QuantizeLinear of ``tensor`` reads in a model ``rewrite.insert_qdq`` wrote (``tensor``
    itself when it has no quantizer or is a graph input)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    dq = producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return tensor
    q = producer.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else tensor


class _Scorer:
    """Per output channel, <y, y_ref>, <y, y> and <y_ref, y_ref> of one layer's quantized output y against its FP32
    output y_ref over the search samples, computed by ONNX Runtime (:func:`_scoring_model`)."""

    def __init__(self, layer: Layer, graph: Graph, opsets, x_quant, x_float, spec: QuantSpec, quantized_input: bool):
        self.spec = spec if quantized_input else None
        plain = session(_layer_model(layer.node, graph, opsets), optimize=False)
        w = graph.value(layer.weight).astype(np.float32)
        self.reference = [plain.run(None, {layer.node.input[0]: x, layer.node.input[1]: w})[0] for x in x_float]
        rank = self.reference[0].ndim
        out_axis = layer.out_axis % rank
        others = tuple(a for a in range(rank) if a != out_axis)
        self.ref = sum(np.square(y, dtype=np.float64).sum(axis=others) for y in self.reference)
        self.sess = session(_scoring_model(layer, graph, opsets, rank, self.spec), optimize=False)
        self.x = x_quant

    def scores(self, act: tuple[float, float] | None, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dot, norm^2, reference norm^2) per output channel, quantizing x to the range ``act`` and the weight at
        ``w_scale``."""
        feed = {"w_scale": np.asarray(w_scale, np.float32)}
        if self.spec is not None:
            scale, zp = qparams(act[0], act[1], self.spec)
            feed["x_scale"], feed["x_zp"] = np.asarray(scale, np.float32).reshape(()), np.asarray(zp).reshape(())
        dot = norm = 0.0
        for x, y_ref in zip(self.x, self.reference, strict=True):
            d, n = self.sess.run(None, {**feed, "x": x, "y_ref": y_ref})
            dot, norm = dot + d.astype(np.float64), norm + n.astype(np.float64)
        return np.atleast_1d(dot), np.atleast_1d(norm), np.atleast_1d(self.ref)


def _measures(scores, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, squared error) per output channel (``per_channel``) or of the whole output, from the sums."""
    dot, norm, ref = scores
    if not per_channel:
        dot, norm, ref = dot.sum(keepdims=True), norm.sum(keepdims=True), ref.sum(keepdims=True)
    den = np.sqrt(norm * ref)
    cos = np.where(den > 0, dot / np.where(den > 0, den, 1.0), 1.0)
    return cos, norm - 2.0 * dot + ref


def refine(
    calibrated: Calibrated,
    batches: Callable[[int], Iterable[Mapping[str, np.ndarray]]],
    search: Search = Search(),
    *,
    progress: bool = True,
) -> Report:
    """Search again the weight scales (``calibrated.scales``) and the activation ranges of every layer's input
    (:meth:`Calibrated.set_ranges`), in place, as the module doc says; ``batches(n)`` yields the feed dicts of the
    first ``n`` calibration samples (``FeedSource.batches(batch, 0, n)``). Returns what changed."""
    t0 = time.perf_counter()
    graph, model = calibrated.graph, calibrated.float_model
    plan = calibrated.plan()
    ranges = dict(calibrated.ranges(plan.calibrated))
    floors = rewrite.weight_scale_floors(graph, plan, rewrite.activation_qparams(plan, ranges))
    feeds = [dict(f) for f in batches(search.samples)]
    report = Report(samples=sum(max((len(v) for v in f.values() if np.ndim(v)), default=1) for f in feeds))
    searched = shared_roots(graph, plan)  # ranges never searched: read by more than one node
    # A scale above max|w| / 127 only coarsens the grid (nothing is clipped at max|w|): such weights only shrink.
    ceiling = 1.0 if calibrated.settings.weight_method == "minmax" else search.span
    if not (calibrated.settings.rounding == "nearest" if search.weights is None else search.weights):
        ceiling = 0.0  # the weights keep their scales
    bar = tqdm(layers(graph, plan), desc="easyquant", unit="layer", disable=not progress, leave=False)
    for layer in bar:
        root = plan.activations.get(layer.x)
        act_free = root is not None and root not in searched
        if not act_free and ceiling == 0:
            continue  # nothing of this layer's to search
        quantized = rewrite.insert_qdq(model, plan, ranges, None, calibrated.scales)
        x_quant = _values(quantized, pre_quantizer(quantized, layer.x), feeds)
        x_float = _values(model, layer.x, feeds)
        scorer = _Scorer(layer, graph, model.opset_import, x_quant, x_float, plan.activation, root is not None)
        w_scale, floor = calibrated.scales[layer.weight], floors.get(layer.weight)
        result = _search_layer(scorer, ranges.get(root), w_scale, floor, act_free, search, ceiling)
        if root is not None:
            searched.add(root)
            ranges[root] = result.pop("range")
        else:
            result.pop("range")
        calibrated.scales[layer.weight] = result.pop("w_scale")
        report.layers.append(LayerReport(layer.name, **result))
        bar.set_postfix(cosine=f"{result['cosine_after']:.4f}")
    bar.close()
    calibrated.set_ranges({r: ranges[r] for r in searched if r in ranges})
    report.seconds = time.perf_counter() - t0
    return report


def _search_layer(scorer: _Scorer, act_range, w_scale, floor, act_free: bool, search: Search, ceiling: float) -> dict:
    """The alternating search of one layer; returns its chosen range and weight scale and the report's fields.

    A candidate wins when its cosine is higher and its squared error no higher than the start's (per channel in
    the weight step, of the whole output in the activation step): the cosine is blind to the output's magnitude,
    which a clipping scale shrinks."""
    base_w = np.asarray(w_scale, np.float32)
    lowest = np.zeros_like(base_w) if floor is None else np.asarray(floor, np.float32).reshape(base_w.shape)
    f_w = np.ones(base_w.shape, np.float64)
    f_a = 1.0
    searched_act = act_free and act_range is not None

    def act(f: float):
        return None if act_range is None else (act_range[0] * f, act_range[1] * f)

    def w_at(f) -> np.ndarray:
        return np.maximum((base_w * f).astype(np.float32), lowest)

    first = scorer.scores(act(1.0), w_at(f_w))
    per_channel = f_w.ndim == 1 and first[0].size == f_w.size
    start_cos, start_err = _measures(first, False)
    channel_err = _measures(first, per_channel)[1]
    for r in range(search.rounds):
        grids = (search.coarse_factors(), search.fine_steps()) if r == 0 else (search.fine_steps(),)
        if ceiling > 0:
            f_w = _weight_step(scorer, act(f_a), w_at, f_w, grids, per_channel, channel_err, ceiling)
        if searched_act:
            f_a = _act_step(scorer, act, w_at(f_w), f_a, grids, start_err)
    final_cos, final_err = _measures(scorer.scores(act(f_a), w_at(f_w)), False)
    if final_cos[0] < start_cos[0] or final_err[0] > start_err[0]:
        f_w, f_a, final_cos = np.ones_like(f_w), 1.0, start_cos
    return {
        "range": act(f_a) if act_range is not None else None,
        "w_scale": w_at(f_w),
        "cosine_before": float(start_cos[0]),
        "cosine_after": float(final_cos[0]),
        "activation_factor": f_a if searched_act else None,
        "weight_factors": (float(f_w.min()), float(f_w.max())),
    }


def _weight_step(scorer, act, w_at, f_w, grids, per_channel: bool, limit, ceiling: float) -> np.ndarray:
    """Per output channel (or for the whole weight), the factor (``f_w`` times one of the first grid, at most
    ``ceiling``) with the highest cosine and an error within ``limit``; then the same around it on each next grid."""
    best_f = f_w.copy()
    best_c = _measures(scorer.scores(act, w_at(best_f)), per_channel)[0].reshape(best_f.shape)
    for grid in grids:
        centre = best_f.copy()
        for g in grid[1:]:
            cand = centre * g
            allowed = cand <= ceiling * (1 + 1e-9)
            if not allowed.any():
                continue
            c, err = (m.reshape(best_f.shape) for m in _measures(scorer.scores(act, w_at(cand)), per_channel))
            better = (c > best_c) & (err <= limit.reshape(best_f.shape)) & allowed
            best_f, best_c = np.where(better, cand, best_f), np.where(better, c, best_c)
    return best_f


def _act_step(scorer, act, w_scale, f_a: float, grids, limit) -> float:
    """The factor of the input's range with the highest cosine of the whole output and an error within
    ``limit``, grid after grid."""
    best_f, best_c = f_a, _measures(scorer.scores(act(f_a), w_scale), False)[0][0]
    for grid in grids:
        centre = best_f
        for g in grid[1:]:
            c, err = _measures(scorer.scores(act(centre * g), w_scale), False)
            if c[0] > best_c and err[0] <= limit[0]:
                best_f, best_c = centre * g, c[0]
    return best_f
