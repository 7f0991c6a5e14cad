"""How much each quantized layer costs: its own error and the model's with only that layer quantized, and the
weights' per-tensor vs per-channel error. :func:`lowbit.onnx.analyze` reports these; automatic mixed precision
ranks layers by them (:func:`lowbit.onnx.stages.search`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from lowbit.analysis import Error, WeightReport, weight_report
from lowbit.data import Feed
from lowbit.errors import AnalyzeError
from lowbit.onnx import placement
from lowbit.onnx.calibration import Calibrated, units
from lowbit.onnx.graph import Graph, attribute
from lowbit.onnx.measure import compare_tensors
from lowbit.onnx.rules import rule_for, unit_output

CHUNK = 12  # single-layer models held in memory at once


def first_float_output(graph: Graph) -> str:
    for name in graph.outputs:
        if graph.is_float(name):
            return name
    raise AnalyzeError("the model has no float output to compare")


def layer_sensitivity(
    calibrated: Calibrated,
    layers: Sequence[str],
    feeds: Iterable[Feed],
    *,
    total: int | None = None,
    progress: bool = True,
) -> dict[str, tuple[Error, Error]]:
    """For each layer of ``layers``: (its output's error, the model output's error) with only that layer
    quantized, built from ``calibrated``. Models are built and run :data:`CHUNK` at a time."""
    graph = calibrated.graph
    out_name = first_float_output(graph)
    everything = units(graph, calibrated.plan())
    result: dict[str, tuple[Error, Error]] = {}
    bar = tqdm(total=len(layers), desc="layer sensitivity", unit="layer", disable=not progress)
    for start in range(0, len(layers), CHUNK):
        chunk = layers[start : start + CHUNK]
        candidates = {}
        for name in chunk:
            others = [u for u in everything if u != name]
            model = calibrated.build(keep_float=others).model
            candidates[name] = (model, [out_name, unit_output(graph, name)])
        errors = compare_tensors(calibrated.float_model, candidates, feeds, total=total, progress=False)
        for name in chunk:
            own = errors[name][unit_output(graph, name)]
            result[name] = (own, errors[name][out_name])
            bar.update(1)
    bar.close()
    return result


def weight_reports(graph: Graph, plan: placement.Plan) -> list[WeightReport]:
    """Per-tensor vs per-channel SQNR (in the plan's format: int8 or FP8) of every weight of ``plan`` that has
    output channels (whatever the plan chose for it), worst per tensor first."""
    out, seen = [], set()
    for node in graph.nodes:
        rule = rule_for(node)
        if rule is None:
            continue
        for index in rule.weight_inputs:
            name = node.input[index] if index < len(node.input) else ""
            if name not in plan.weights or name in seen:
                continue
            seen.add(name)
            w = graph.value(name).astype(np.float32)
            axis = rule.weight_axis(node, graph, index)
            if axis is None or w.ndim < 2:
                continue
            groups = attribute(node, "group", 1)
            depthwise = node.op_type == "Conv" and groups > 1 and groups == w.shape[0]
            report = weight_report(graph.node_name(node), name, w, axis, depthwise, plan.activation.format)
            out.append(report)
    return sorted(out, key=lambda r: r.per_tensor_sqnr_db)
