"""Layer-wise sensitivity analysis of a quantized ONNX model: which layers lose the most, and why.

from lowbit.onnx.analyze import analyze
a = analyze("model.onnx", calib="calib.npz", report="report.html")
print(a.table())

Per quantized layer (Conv, Gemm, MatMul, Add, ...), against FP32 on the analysis samples:
- ``accumulated``: the error of the layer's output in the fully quantized model (every layer before it adds);
- ``own``: the error of the layer's output with only that layer quantized (its own loss);
- ``own_model``: the error of the model's output with only that layer quantized: its sensitivity, by which
  layers are ranked (lowest SQNR first).
Per calibrated tensor: a histogram and the range each calibrator chooses on it, with the SQNR each range gives.
Per weight: per-tensor vs per-channel SQNR and, where per-tensor is poor, every channel's range.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm.auto import tqdm

from lowbit import calib as calib_registry
from lowbit import sampling
from lowbit.analysis import Analysis, Error, LayerReport, WeightReport, tensor_report, weight_report
from lowbit.calib.histogram_methods import HistogramCalibrator
from lowbit.data import DataError, Feed, InputSpec, open_feeds
from lowbit.errors import AnalyzeError
from lowbit.onnx import placement, rewrite
from lowbit.onnx.calibration import Calibrated, calibrate_model, units
from lowbit.onnx.graph import Graph
from lowbit.onnx.measure import compare_tensors
from lowbit.onnx.model import batch_size_for, free_batch, input_specs, load_model, preprocess
from lowbit.onnx.rules import rule_for, unit_output
from lowbit.paths import check_outputs

CHUNK = 12  # single-layer models held in memory at once
SAMPLES = 64


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
    """Per-tensor vs per-channel int8 SQNR of every weight of ``plan`` that has output channels (whatever the
    plan chose for it), worst per tensor first."""
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
            groups = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
            depthwise = node.op_type == "Conv" and groups > 1 and groups == w.shape[0]
            report = weight_report(graph.node_name(node), name, w, axis, depthwise)
            out.append(report)
    return sorted(out, key=lambda r: r.per_tensor_sqnr_db)


def _analysis_feeds(source, eval_source, batch: int, samples: int):
    if eval_source is not None:
        return eval_source.batches(batch, 0, samples)
    return source.batches(batch, 0, samples)


def analyze(
    model: str | os.PathLike,
    calib: Any,
    *,
    eval_data: Any = None,
    metric: Any = None,
    max_drop: float | None = None,
    method: str = "mse",
    method_options: dict | None = None,
    target: str = "ort",
    per_channel: bool = True,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    bias_correction: bool = True,
    rounding: str = "gptq",
    batch_size: int = 8,
    max_samples: int = 512,
    samples: int = SAMPLES,
    report: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    extract: Sequence[str] = (),
    extract_dir: str | os.PathLike | None = None,
    profile: bool = True,
    image_options: Any = None,
    progress: bool = True,
) -> Analysis:
    """Calibrate ``model`` on ``calib`` as :func:`lowbit.onnx.pipeline.quantize` would, then measure every
    quantized layer against FP32 on ``samples`` samples (of ``eval_data`` if given, else of ``calib``).

    ``metric`` (a :class:`lowbit.onnx.metrics.Metric`) with ``max_drop`` also runs automatic mixed precision
    (:func:`lowbit.onnx.mixed.search`) and records its curve. ``extract`` names layers whose neighbourhood is
    written as standalone ONNX models with recorded inputs (:func:`lowbit.onnx.extract.extract`), into
    ``extract_dir``. ``profile`` runs the quantized model under ONNX Runtime's profiler
    (:func:`lowbit.onnx.kernels.profile`). ``report`` writes the HTML report, ``json_path`` the numbers."""
    from lowbit.onnx import extract as extract_mod
    from lowbit.onnx import kernels, mixed

    t_start = time.perf_counter()
    model_path = Path(model)
    check_outputs(
        {"report": report, "json_path": json_path}, {"model": model_path, "calib": calib, "eval_data": eval_data}
    )
    if target not in placement.TARGETS:
        raise AnalyzeError(f"unknown target {target!r}; targets are {', '.join(placement.TARGETS)}")
    if method not in calib_registry.available():
        raise AnalyzeError(f"unknown method {method!r}; methods: {', '.join(calib_registry.available())}")
    for name, value in (("samples", samples), ("batch_size", batch_size), ("max_samples", max_samples)):
        if not isinstance(value, int) or value < 1:
            raise AnalyzeError(f"{name} must be a positive integer, got {value!r}")
    if max_drop is not None and not max_drop >= 0:
        raise AnalyzeError(f"max_drop must be 0 or more (the largest drop from FP32 allowed), got {max_drop}")
    if calib is None:
        raise AnalyzeError("the analysis calibrates the model as quantize would: give calibration data (--calib)")
    if (metric is None) != (max_drop is None):
        raise AnalyzeError("automatic mixed precision needs both a metric and max_drop")
    float_model = preprocess(load_model(model_path))
    inputs = tuple(InputSpec(*s) for s in input_specs(float_model))
    source = open_feeds(calib, inputs, image_options=image_options)
    eval_source = (
        open_feeds(eval_data, inputs, image_options=image_options, role="evaluation data")
        if eval_data is not None
        else None
    )
    graph = Graph(float_model)
    placement.check_exclusions(graph, exclude, exclude_ops)
    full = placement.plan(graph, target, exclude=exclude, exclude_ops=exclude_ops, per_channel=per_channel)
    if not full.quantized_nodes:
        raise AnalyzeError("nothing to analyse: no node of a supported type (Conv, Gemm, MatMul, ...) is quantized")
    names = {graph.node_name(n) for n in graph.nodes}
    missing = [name for name in extract if name not in names]
    if missing:  # say so now, not after minutes of analysis
        known = ", ".join(full.quantized_nodes[:30])
        raise AnalyzeError(f"--extract {missing[0]!r}: no node of that name; quantized nodes include: {known}")

    batch = batch_size_for(inputs, batch_size)
    cal_source = sampling.split(source, max_samples).calib
    run_model = free_batch(float_model, batch_size) if batch == 1 < batch_size else None  # as quantize does
    cal_batches = cal_source.batches(batch_size if run_model is not None else batch)
    histogram_based = issubclass(type(calib_registry.create(method)), HistogramCalibrator)
    observers = {}
    if not histogram_based:
        from lowbit.calib.histogram_methods import MSECalibrator

        observers = {t: [MSECalibrator(tensor=t)] for t in full.calibrated}
    calibrated = calibrate_model(
        float_model,
        cal_batches,
        target=target,
        method=method,
        method_options=method_options,
        exclude=exclude,
        exclude_ops=exclude_ops,
        per_channel=per_channel,
        bias_correction=bias_correction,
        rounding=rounding,
        samples=cal_source.num_samples,
        every_tensor=True,
        total=len(cal_batches) or None,
        progress=progress,
        observers=observers,
        run_model=run_model,
    )
    feeds = _analysis_feeds(source, eval_source, batch, samples)
    n_batches = len(feeds) or None
    first_feed = next(iter(feeds), None)
    if first_feed is None:
        raise DataError("the analysis data yielded no samples")
    n_samples = sum(next(iter(f.values())).shape[0] for f in feeds)

    built = calibrated.build()
    plan = built.plan
    layer_names = units(graph, plan)
    out_name = first_float_output(graph)
    outputs = {name: unit_output(graph, name) for name in layer_names}
    accumulated = compare_tensors(
        float_model,
        {"full": (built.model, [out_name, *dict.fromkeys(outputs.values())])},
        feeds,
        total=n_batches,
        desc="whole model",
        progress=progress,
    )["full"]
    top1 = _top1(float_model, built.model, feeds, progress)
    own = layer_sensitivity(calibrated, layer_names, feeds, total=n_batches, progress=progress)

    by_name = {graph.node_name(n): n for n in graph.nodes}
    layers = []
    for i, name in enumerate(layer_names):
        node = by_name[name]
        ins = [t for t in node.input if t in plan.activations]
        layers.append(LayerReport(name, node.op_type, outputs[name], accumulated[outputs[name]], *own[name], ins, i))
    layers.sort(key=lambda r: (r.own_model.sqnr_db, r.own_model.cosine))

    tensors = {}
    for tensor in plan.calibrated:
        cal = calibrated.calibrators.get(tensor)
        hist = cal if isinstance(cal, HistogramCalibrator) else (observers.get(tensor) or [None])[0]
        if hist is not None and hist.num_batches and hist.histogram.total:
            tensors[tensor] = tensor_report(tensor, hist, rewrite.activation_spec(target), method)
    analysis = Analysis(
        str(model_path),
        target,
        method,
        n_samples,
        calibrated.seconds,
        0.0,
        out_name,
        accumulated[out_name],
        top1,
        layers,
        tensors,
        weight_reports(graph, plan),
    )
    if metric is not None and max_drop is not None:
        analysis.mixed = mixed.search(calibrated, [r.name for r in layers], metric, max_drop, progress=progress)
    if extract:
        folder = Path(extract_dir) if extract_dir is not None else model_path.parent
        for name in extract:
            analysis.extracted += [str(p) for p in extract_mod.extract(calibrated, built, name, feeds, folder)]
    if profile:  # the model a user would deploy: the mixed one when a budget was searched
        deployed = built.model if analysis.mixed is None else calibrated.build(keep_float=analysis.mixed.kept).model
        analysis.profile = kernels.profile(deployed, first_feed)
    analysis.seconds = time.perf_counter() - t_start
    analysis.write(json_path, report)
    return analysis


def _top1(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Iterable[Feed], progress: bool
) -> float | None:
    from lowbit.onnx.compare import agreement
    from lowbit.onnx.model import session

    a = agreement(session(reference), session(candidate), feeds, progress=progress)
    return None if a is None or a.top1 is None else a.top1 * 100
