"""Layer-wise sensitivity analysis of a quantized ONNX model: which layers lose the most, and why.

    import lowbit.onnx
    a = lowbit.onnx.analyze("model.onnx", "calib.npz", "int8", report=Reporting(html="report.html"))
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
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from lowbit import calib as calib_registry
from lowbit import sampling
from lowbit.analysis import Analysis, LayerReport, tensor_report, write
from lowbit.calib.histogram_methods import HistogramCalibrator, MSECalibrator
from lowbit.data import DataError, Feed, samples_in
from lowbit.errors import AnalyzeError
from lowbit.onnx import extract as extract_mod
from lowbit.onnx import kernels, mixed, placement, stages
from lowbit.onnx.calibration import Calibrated, plan_for, units
from lowbit.onnx.compare import agreement
from lowbit.onnx.measure import compare_tensors
from lowbit.onnx.model import session
from lowbit.onnx.rules import unit_output
from lowbit.onnx.sensitivity import first_float_output, layer_sensitivity, weight_reports
from lowbit.onnx.settings import Budget, Options, Settings, from_keywords
from lowbit.paths import check_outputs
from lowbit.recipe import Config

SAMPLES = 64


@dataclass(frozen=True)
class Reporting:
    """What the analysis measures on and writes: ``samples`` samples measured (of the evaluation data if given,
    else of the calibration data), the HTML report at ``html``, every number as JSON at ``json``, the float and
    quantized cut of the nodes named in ``extract`` with their recorded inputs (into ``extract_dir``, default:
    beside the model), and with ``profile`` the kernels ONNX Runtime runs for the quantized model."""

    samples: int = SAMPLES
    html: Path | None = None
    json: Path | None = None
    extract: tuple[str, ...] = ()
    extract_dir: Path | None = None
    profile: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise AnalyzeError(f"samples must be a positive integer, got {self.samples!r}")
        for name in ("html", "json", "extract_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "extract", tuple(self.extract))


# The analysis keywords of the call before recipes, and the Reporting field each became.
_REPORTING_KEYWORDS = {"samples": "samples", "report": "html", "json_path": "json", "extract": "extract",
                       "extract_dir": "extract_dir", "profile": "profile"}  # fmt: skip


def analyze(
    model: str | os.PathLike,
    calib: Any,
    config: str | Config = "int8",
    *,
    eval_data: Any = None,
    budget: Budget | None = None,
    options: Options = Options(),
    report: Reporting = Reporting(),
    **before_recipes: Any,
) -> Analysis:
    """Calibrate ``model`` on ``calib`` as :func:`lowbit.onnx.quantize` would with the recipe ``config``, then
    measure every quantized layer against FP32 (see the module doc and :class:`Reporting`). ``budget`` also runs
    automatic mixed precision (:func:`lowbit.onnx.mixed.search`) and records its curve. The keyword arguments
    of the call before recipes still work, with a DeprecationWarning that shows the new call."""
    if not isinstance(report, Reporting):  # report= was the HTML path before recipes
        before_recipes["report"], report = report, Reporting()
    if before_recipes:
        config, options, budget, report = _from_keywords(config, options, budget, report, before_recipes)
    t_start = time.perf_counter()
    settings = Settings.of(config)
    check_outputs({"report": report.html, "json_path": report.json},
                  {"model": Path(model), "calib": calib, "eval_data": eval_data})  # fmt: skip
    if calib is None:
        raise AnalyzeError("the analysis calibrates the model as quantize would: give calibration data (--calib)")
    if settings.dynamic or settings.weight_only is not None:
        kind = "a dynamic" if settings.dynamic else "a weight-only"
        raise AnalyzeError(f"the analysis measures static quantization; {kind} recipe has no ranges to analyse")
    loaded = stages.open_model(Path(model), settings, options.batch_size)
    data = stages.open_data(loaded, calib, eval_data, options)
    full = _check_plan(loaded, settings, report.extract)
    calibrated, observers = _calibrate(loaded, settings, full, data.calib, options)
    feeds = (data.eval or data.calib).batches(loaded.batch, 0, report.samples)
    analysis = _measure(loaded, settings, calibrated, observers, feeds, options.progress)
    built = calibrated.build()
    if budget is not None:
        ranked = [r.name for r in analysis.layers]
        analysis.mixed = mixed.search(calibrated, ranked, budget.metric, budget.max_drop, progress=options.progress)
    folder = report.extract_dir or loaded.path.parent
    for name in report.extract:
        analysis.extracted += [str(p) for p in extract_mod.extract(calibrated, built, name, feeds, folder)]
    if report.profile:  # the model a user would deploy: the mixed one when a budget was searched
        deployed = built.model if analysis.mixed is None else calibrated.build(keep_float=analysis.mixed.kept).model
        analysis.profile = kernels.profile(deployed, next(iter(feeds)))
    analysis.seconds = time.perf_counter() - t_start
    write(analysis, report.json, report.html)
    return analysis


def _from_keywords(config, options, budget, report, keywords):
    moved = {_REPORTING_KEYWORDS[k]: keywords.pop(k) for k in list(keywords) if k in _REPORTING_KEYWORDS}
    report = replace(report, **moved)
    if keywords or moved:
        config, options, budget = from_keywords(config, options, budget, keywords, "analyze")
    return config, options, budget, report


def _check_plan(loaded: stages.Model, settings: Settings, extract: tuple[str, ...]) -> placement.Plan:
    """The full plan, refused when it quantizes nothing or ``extract`` names a node the model lacks."""
    full = plan_for(loaded.graph, settings)
    if not full.quantized_nodes and not full.bodies:
        raise AnalyzeError("nothing to analyse: no node of a supported type (Conv, Gemm, MatMul, ...) is quantized")
    names = {loaded.graph.node_name(n) for n in loaded.graph.nodes}
    missing = [name for name in extract if name not in names]
    if missing:  # say so now, not after minutes of analysis
        known = ", ".join(full.quantized_nodes[:30])
        raise AnalyzeError(f"--extract {missing[0]!r}: no node of that name; quantized nodes include: {known}")
    return full


def _calibrate(loaded, settings: Settings, full: placement.Plan, source, options: Options) -> tuple[Calibrated, dict]:
    """Calibrate once (every tensor, for the report's histograms); a method without a histogram gets an MSE
    calibrator beside it on each planned tensor, whose histogram the report shows."""
    observers = {}
    if not issubclass(type(calib_registry.create(settings.method)), HistogramCalibrator):
        observers = {t: [MSECalibrator(tensor=t)] for t in full.calibrated}
    cal_source = sampling.split(source, options.max_samples).calib
    calibrated = stages.calibrate(loaded, settings, cal_source, options, every_tensor=True, observers=observers)
    return calibrated, observers


def _measure(loaded, settings: Settings, calibrated: Calibrated, observers, feeds, progress: bool) -> Analysis:
    """Every layer's errors against FP32 on ``feeds``, every calibrated tensor's histogram and ranges, every
    weight's per-tensor vs per-channel error."""
    if next(iter(feeds), None) is None:
        raise DataError("the analysis data yielded no samples")
    graph, float_model = loaded.graph, loaded.float_model
    n_batches = len(feeds) or None
    n_samples = sum(samples_in(f) for f in feeds)
    built = calibrated.build()
    plan = built.plan
    layer_names = units(graph, plan)
    out_name = first_float_output(graph)
    outputs = {name: unit_output(graph, name) for name in layer_names}
    tensors_read = [out_name, *dict.fromkeys(outputs.values())]
    accumulated = compare_tensors(float_model, {"full": (built.model, tensors_read)}, feeds, total=n_batches,
                                  desc="whole model", progress=progress)["full"]  # fmt: skip
    top1 = _top1(float_model, built.model, feeds, progress)
    own = layer_sensitivity(calibrated, layer_names, feeds, total=n_batches, progress=progress)
    by_name = {graph.node_name(n): n for n in graph.nodes}
    layers = []
    for i, name in enumerate(layer_names):
        node = by_name[name]
        ins = [t for t in node.input if t in plan.activations]
        layers.append(LayerReport(name, node.op_type, outputs[name], accumulated[outputs[name]], *own[name], ins, i))
    layers.sort(key=lambda r: (r.own_model.sqnr_db, r.own_model.cosine))
    return Analysis(
        str(loaded.path), settings.target.name, settings.method, n_samples, calibrated.seconds, 0.0, out_name,
        accumulated[out_name], top1, layers, _tensor_reports(settings, calibrated, plan, observers),
        weight_reports(graph, plan),
    )  # fmt: skip


def _tensor_reports(settings: Settings, calibrated: Calibrated, plan: placement.Plan, observers) -> dict:
    tensors = {}
    for tensor in plan.calibrated:
        cal = calibrated.calibrators.get(tensor)
        hist = cal if isinstance(cal, HistogramCalibrator) else (observers.get(tensor) or [None])[0]
        if hist is not None and hist.num_batches and hist.histogram.total:
            tensors[tensor] = tensor_report(tensor, hist, settings.activation, settings.method)
    return tensors


def _top1(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Iterable[Feed], progress: bool
) -> float | None:
    a = agreement(session(reference), session(candidate), feeds, progress=progress)
    return None if a is None or a.top1 is None else a.top1 * 100
