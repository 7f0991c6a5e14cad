"""Calibrate a float model once, then build quantized models from it with any set of nodes kept in float.

:func:`calibrate_model` runs the float model over the calibration batches once, feeding every calibrator,
GPTQ's second moments and bias correction's channel means in the same pass. :meth:`Calibrated.build` then
places Q/DQ for the target with some nodes left in float and writes the model: no data is read again. The
sensitivity analysis (one model per layer) and automatic mixed precision (one model per trial) rest on this;
``lowbit quantize`` builds once.

Every build uses the same weight codes and scales (GPTQ ran once, for the full plan): a layer quantized in
two builds is quantized the same way in both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from lowbit import calib as calib_registry
from lowbit.calib.base import Calibrator
from lowbit.onnx import bias_correction as bc
from lowbit.onnx import collect, controlflow, placement, rewrite
from lowbit.onnx import rounding as weight_rounding
from lowbit.onnx.graph import Graph
from lowbit.onnx.rules import rule_for
from lowbit.onnx.settings import Settings
from lowbit.recipe import Config


@dataclass
class Built:
    """One quantized model: the model, its plan, and the bias corrections it got."""

    model: onnx.ModelProto
    plan: placement.Plan
    bias_corrections: dict[str, float] = field(default_factory=dict)


@dataclass
class Calibrated:
    """What one calibration pass over a float model learned (see the module doc)."""

    float_model: onnx.ModelProto
    settings: Settings
    calibrators: dict[str, Calibrator]
    means: dict[str, np.ndarray] = field(default_factory=dict)
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # the weights', chosen once (rewrite.weight_scales)
    seconds: float = 0.0
    batches: int = 0
    refinement: Any = None  # what a refinement reported (lowbit.onnx.easyquant.Report), if one ran

    def __post_init__(self):
        self.graph = Graph(self.float_model)
        self._ranges: dict[str, tuple[float, float]] = {}

    def plan(self, keep_float: Collection[str] = (), model: onnx.ModelProto | None = None) -> placement.Plan:
        """The target's plan with the user's exclusions and the nodes named in ``keep_float`` left in float (and
        the bodies whose tensors calibration never saw)."""
        graph = self.graph if model is None else Graph(model)
        full = plan_for(graph, self.settings, keep_float)
        return full.observed(self.ranges(full.calibrated))

    def ranges(self, tensors: Iterable[str]) -> dict[str, tuple[float, float]]:
        """The calibrated range of each tensor (symmetric where the target stores activations symmetrically),
        computed once and kept; a tensor never observed (in an If branch that never ran) has none."""
        todo = {
            t: c
            for t in tensors
            if t not in self._ranges and (c := self.calibrators.get(t)) is not None and c.num_batches
        }
        if todo:
            self._ranges.update(collect.ranges(todo, symmetric=self.settings.activation.symmetric))
        return {t: self._ranges[t] for t in tensors if t in self._ranges}

    def set_ranges(self, ranges: Mapping[str, tuple[float, float]]) -> None:
        """Replace the ranges of some tensors (a refinement chose them: :mod:`lowbit.onnx.easyquant`)."""
        self._ranges.update({t: (float(lo), float(hi)) for t, (lo, hi) in ranges.items()})

    def build(self, keep_float: Collection[str] = ()) -> Built:
        """The quantized model with the nodes named in ``keep_float`` (and the user's exclusions) in float."""
        plan = self.plan(keep_float)
        ranges = self.ranges(plan.calibrated)
        to_quantize, corrections = self.float_model, {}
        if self.means:
            to_quantize, corrections = bc.correct(
                self.float_model,
                plan,
                self.means,
                rewrite.dequantized_weights(self.float_model, plan, self.codes, self.scales),
            )
            # The corrected biases are new initializers (and bias-less layers gained one): plan again to place them.
            plan = self.plan(keep_float, to_quantize)
        model = rewrite.insert_qdq(to_quantize, plan, ranges, self.codes, self.scales)
        return Built(model, plan, corrections)


def plan_for(graph: Graph, settings: Settings, keep_float: Collection[str] = ()) -> placement.Plan:
    """The target's plan of ``graph`` with the recipe's exclusions and the nodes named in ``keep_float`` in float."""
    return placement.plan(
        graph,
        settings.target,
        exclude=settings.exclude,
        exclude_ops=settings.exclude_ops,
        exclude_nodes=keep_float,
        per_channel=settings.per_channel,
        activation=settings.activation,
    )


def calibrator_options(settings: Settings) -> dict[str, Any]:
    """Calibrator options that fit the target's activation grid unless the user chose otherwise
    (:func:`lowbit.calib.grid_options` on the activation spec)."""
    return calib_registry.grid_options(settings.method, settings.activation, dict(settings.method_options))


def units(graph: Graph, plan: placement.Plan) -> list[str]:
    """The quantized nodes that can be kept in float one at a time: compute and elementwise ops (Conv, Gemm,
    MatMul, Add, ...), inside If/Loop/Scan bodies too. Relu, MaxPool, Reshape and the like follow the node that
    feeds them and are left out."""
    quantized = set(plan.quantized_nodes)
    out = []
    for node in graph.nodes:
        name = graph.node_name(node)
        rule = rule_for(node)
        if name in quantized and rule is not None and rule.kind in ("compute", "elementwise"):
            out.append(name)
    for (holder, attribute), sub in plan.bodies.items():
        out += units(Graph(graph.model, controlflow.find(graph.proto, holder, attribute), outer=graph), sub)
    return out


def activations(graph: Graph) -> list[str]:
    """Every float tensor computed at run time or fed as a graph input, in graph order."""
    seen: list[str] = [name for name in graph.inputs if graph.is_float(name)]
    for node in graph.nodes:
        seen.extend(o for o in node.output if graph.is_activation(o))
    return list(dict.fromkeys(seen))


def calibrate_model(
    float_model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    settings: Settings | Config | str = "int8",
    *,
    samples: int | None = None,
    every_tensor: bool = False,
    total: int | None = None,
    progress: bool = True,
    observers: Mapping[str, Sequence[Any]] | None = None,
    run_model: onnx.ModelProto | None = None,
    refine: Callable[[Calibrated], None] | None = None,
) -> Calibrated:
    """Calibrate ``float_model`` (preprocessed) on ``batches`` for the recipe ``settings`` (a
    :class:`~lowbit.onnx.settings.Settings`, or a Config or preset name): the ranges of the tensors the full plan
    quantizes (``every_tensor``: of every float activation, so that any later plan, and a TensorRT cache, find
    theirs), the statistics of the weight-rounding method (GPTQ's second moments; ``samples`` is the number of
    calibration samples when known) and the input means bias correction needs. ``observers`` (tensor -> objects
    with ``update(array)``) see their tensor's batches in the same pass. ``run_model``: the model run over
    ``batches`` when it is not ``float_model`` itself: the same graph with its batch size freed
    (:func:`lowbit.onnx.model.free_batch`), so that a model fixed at batch 1 calibrates at a larger batch; what is
    built stays ``float_model``. ``refine`` (a refinement such as :func:`lowbit.onnx.easyquant.refine`) may change
    the ranges and the weight scales once they are chosen, before the weight rounding picks its codes at them."""
    settings = settings if isinstance(settings, Settings) else Settings.of(settings)
    graph = Graph(float_model)
    full = plan_for(graph, settings)
    tensors = list(full.calibrated)
    if every_tensor:
        tensors += [t for t in activations(graph) if t not in set(full.calibrated)]
    means: dict[str, bc.ChannelMean] = {}
    if settings.bias_correction:
        for layer in bc.layers(graph, full):
            means.setdefault(layer.x, bc.ChannelMean(layer.axis))
    rounding = weight_rounding.get(settings.rounding)
    moments = rounding.observers(graph, full, samples)
    feeding: dict[str, list] = {x: [m] for x, m in means.items()}
    for x, m in moments:
        feeding.setdefault(x, []).append(m)
    for name, extra in (observers or {}).items():
        feeding.setdefault(name, []).extend(extra)
    t0 = time.perf_counter()
    cals = collect.collect(
        float_model if run_model is None else run_model,
        tensors,
        batches,
        method=settings.method,
        options=calibrator_options(settings),
        total=total,
        progress=progress,
        observers=feeding,
    )
    result = Calibrated(
        float_model,
        settings,
        cals,
        means={x: m.mean for x, m in means.items()},
        seconds=time.perf_counter() - t0,
        batches=next(iter(cals.values())).num_batches if cals else 0,
    )
    full = full.observed(result.ranges(full.calibrated))
    act = rewrite.activation_qparams(full, result.ranges(full.calibrated))
    floors = rewrite.weight_scale_floors(graph, full, act)
    result.scales = rewrite.weight_scales(graph, full, floors, settings.weight_method, settings.weight_options)
    if refine is not None:
        refine(result)
    # more passes over the data for what did not fit the first (GPTQ's second moments), if it can be read again
    if iter(batches) is not batches:
        rounding.rerun = (float_model if run_model is None else run_model, lambda: batches)
    result.codes = rounding.codes(graph, moments, result.scales, progress)
    return result
