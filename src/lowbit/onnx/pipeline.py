"""``lowbit.onnx.quantize``: an ONNX model in, a quantized ONNX model out, as a short pipeline of stages.

    import lowbit.onnx
    from lowbit.recipe import preset
    result = lowbit.onnx.quantize("model.onnx", "model_int8.onnx", "calib.npz", preset("int8_trt"))
    print(result.table())

open the model and the data -> calibrate once -> [mixed-precision search] -> build (with the refinements the
recipe asks for: GPTQ codes, bias correction) -> [FP16 for the rest] -> write -> compare. Each stage is a function
(:mod:`lowbit.onnx.stages` holds the ones :func:`lowbit.onnx.analyze.analyze` shares).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import lowbit
from lowbit import sampling
from lowbit._io import atomic_write_text
from lowbit._table import format_table
from lowbit.core import QuantSpec, qparams
from lowbit.data import DataError
from lowbit.errors import LowbitError
from lowbit.onnx import collect, compare, fp8, fp16, placement, rewrite, smoothing, stages, weight_only
from lowbit.onnx.calibration import Calibrated, plan_for, units
from lowbit.onnx.dynamic import quantize_dynamic
from lowbit.onnx.graph import Graph
from lowbit.onnx.model import file_size, save_model, session
from lowbit.onnx.settings import DEFAULT_TARGET, HOLDOUT, Budget, Options, QuantizeError, Settings, from_keywords
from lowbit.paths import check_outputs, ranges_path_for
from lowbit.recipe import Config, get_target, to_dict
from lowbit.trt_cache import write_trt_cache

FEW_SAMPLES = 32  # fewer calibration samples than this get a warning: their ranges are noisy
__all__ = ["HOLDOUT", "Budget", "Options", "QuantizeError", "QuantizeResult", "quantize"]


@dataclass
class QuantizeResult:
    """What :func:`quantize` did and what it measured."""

    output: Path
    ranges_path: Path
    target: str
    method: str | None
    dynamic: bool
    quantized_nodes: list[str]
    excluded_nodes: list[str]
    calibration_samples: int = 0
    calibration_seconds: float = 0.0
    trt_cache: Path | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    latency: dict[str, dict[int, float | None]] = field(default_factory=dict)
    agreement: compare.Agreement | None = None
    bias_corrections: dict[str, float] = field(default_factory=dict)
    rounding: str = "nearest"  # the weight rounding that ran
    rounded_layers: int = 0  # layers whose codes the rounding chose (the others were rounded to nearest)
    fp16_nodes: list[str] = field(default_factory=list)
    mixed: Any = None  # a lowbit.onnx.mixed.MixedResult when a budget was searched
    layers: int = 0  # quantized compute, elementwise and embedding layers (the nodes that follow them not counted)
    held_out_samples: int = 0
    samples_note: str = ""  # which samples calibrated and which were held out, in one line
    batch_size: int = 8  # the batch the model ran at (fixed by the model, else the one asked for)
    calibration_batch: int = 8  # the batch calibration ran at (a model fixed at 1 runs larger through a free copy)
    seconds: float = 0.0  # the whole call, calibration included
    warnings: list[str] = field(default_factory=list)
    untimed: dict[int, str] = field(default_factory=dict)  # batch -> why its latency was not measured
    fused: dict[str, int] = field(default_factory=dict)  # decomposed activations rewritten as one op, by op
    refinement: str = ""  # what the recipe's refinement did (easyquant), in a line
    format: str = "int"  # of activations and weights: "int" (int8), "fp8_e4m3", "fp8_e5m2"
    weight_only: str = ""  # weight-only quantization, in words ("int4 symmetric, blocks of 128, MatMulNBits")
    hessian_passes: int = 0  # passes over the calibration data that gathered GPTQ's second moments
    peak_hessian_bytes: int = 0  # the most bytes of those second moments held at once
    smoothing: smoothing.Report | None = None  # what SmoothQuant did, when the recipe asked for it

    @property
    def label(self) -> str:
        """The quantized model's name in tables: "INT8", "FP8 E4M3", "INT4 weight-only", ..."""
        return f"{self.weight_only.split()[0].upper()} weight-only" if self.weight_only else fp8.label(self.format)

    def table(self) -> str:
        """FP32 vs INT8: file size, latency at batch 1 and 8, and output agreement."""
        rows = []
        labels = {"fp32": "FP32", "int8": self.label}  # "int8": the quantized model, whatever its format
        for name in ("fp32", "int8"):
            lat = self.latency.get(name, {})
            row = [labels[name], f"{self.sizes.get(name, 0) / 1e6:.2f} MB"]
            row += ["-" if lat.get(b) is None else f"{lat[b]:.2f} ms" for b in (1, 8)]
            rows.append(row)
        if self.sizes.get("fp32") and self.sizes.get("int8"):
            ratio = self.sizes["int8"] / self.sizes["fp32"]
            speed = [self.latency.get("fp32", {}).get(b) and self.latency.get("int8", {}).get(b) for b in (1, 8)]
            speed_cells = [_speedup(self.latency["fp32"][b], self.latency["int8"][b]) if ok else "-"
                           for b, ok in zip((1, 8), speed, strict=True)]  # fmt: skip
            rows.append([f"{labels['int8']} / FP32", f"x{ratio:.3f}", *speed_cells])
        text = format_table(["model", "file size", "latency b=1", "latency b=8"], rows, "lrrr")
        if self.latency and not get_target(self.target).timed_on_ort:
            text += (
                f"\n(latency on ONNX Runtime CPU; a --target {self.target} model is laid out for "
                f"{get_target(self.target).runtime}, not for this)"
            )
        if fp8.is_fp8(self.format):
            text += "\n(ONNX Runtime's CPU emulates FP8: float kernels between casts; no graph optimization)"
        for b, why in self.untimed.items():
            text += f"\n(- at batch {b}: {why})"
        if self.agreement is not None:
            text += "\n" + agreement_summary(self.agreement, "held-out" if self.held_out_samples else "evaluation")
        return text

    def to_dict(self) -> dict[str, Any]:
        skip = ("agreement", "mixed", "smoothing")
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if k not in skip}
        out["agreement"] = None if self.agreement is None else self.agreement.to_dict()
        out["mixed"] = None if self.mixed is None else self.mixed.to_dict()
        out["smoothing"] = None if self.smoothing is None else self.smoothing.to_dict()
        return out


FEW_COMPARED = 32  # fewer compared samples than this: the summary says its figures are rough


def agreement_summary(a: compare.Agreement, kind: str) -> str:
    """Output agreement in a line or two; NaN/Inf outputs are counted apart and never averaged in; the worst output
    channel is given, with a warning when it is far below the whole output."""
    if a.nonfinite:
        where = "the FP32 model's too" if a.nonfinite_reference else "FP32's are finite"
        warn = f"; WARNING: the INT8 output is NaN/Inf on {a.nonfinite} of {a.samples} samples ({where})"
    else:
        warn = ""
    if a.cosine is None:
        return f"output agreement on {a.samples} {kind} samples: none is finite{warn}"
    top1 = "" if a.top1 is None else f", top-1 agreement {a.top1 * 100:.2f}%"
    sqnr = "" if a.sqnr_db is None else f", SQNR {a.sqnr_db:.1f} dB"
    few = f" (only {a.finite} samples: rough figures)" if a.finite < FEW_COMPARED else ""
    text = (
        f"output agreement on {a.finite} {kind} samples{few}: cosine {a.cosine:.5f}, max abs error "
        f"{a.max_abs_error:.4g} (in the output's units){sqnr}{top1}{warn}"
    )
    worst = a.worst_channel
    if worst is not None:
        text += f"\nworst of the output's {len(a.channel_cosines)} channels (axis 1): {worst[0]}, cosine {worst[1]:.5f}"
        if a.collapsed:
            text += (
                "; WARNING: far below the whole output: those outputs may have collapsed while larger ones hide it; "
                "judge the model with its task metric (--eval module:function)"
            )
    return text


def _speedup(before: float, after: float) -> str:
    ratio = before / after
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def quantize(
    model: str | os.PathLike,
    output: str | os.PathLike,
    calib: Any = None,
    config: str | Config = "int8",
    *,
    eval_data: Any = None,
    budget: Budget | None = None,
    options: Options = Options(),
    **before_recipes: Any,
) -> QuantizeResult:
    """Quantize the ONNX model at ``model`` as the recipe ``config`` says (a :class:`lowbit.recipe.Config` or a
    preset name) and write it to ``output``; return what was done and measured.

    Static (default): activations calibrated on ``calib`` (see :func:`lowbit.data.open_feeds` for what it can
    be), Q/DQ placed for the recipe's target (``ort`` unless it names one), weights rounded by the recipe's
    method (GPTQ unless it says ``nearest``), biases corrected for the mean shift weight rounding causes (unless
    ``bias_correction=False``), and with ``fp16_rest`` every node outside the quantizers in float16. A recipe
    with dynamic activations (``"int8_dynamic"``) quantizes MatMul/Gemm/LSTM weights and needs no ``calib``.
    The chosen ranges and the recipe go to ``<output stem>.ranges.json``; ``options`` (:class:`Options`) bounds
    the work and may also ask for TensorRT's calibration cache. With ``options.compare``, latency and output
    agreement (on all of ``eval_data``, or on up to 64 samples held out of ``calib``) are measured; held-out
    and, past ``max_samples``, calibration samples are a seeded spread over the data (:mod:`lowbit.sampling`).
    ``budget`` (:class:`Budget`: a metric and the largest drop allowed): automatic mixed precision, the most
    sensitive layers kept in float, fewest first (:func:`lowbit.onnx.stages.search`); ``result.mixed`` tells
    the steps.

    Every output path is checked against the model and the data (and made sure to be writable), and the
    evaluation data is read through once, before any work: nothing is written when an option or file is wrong.
    The keyword arguments of the call before recipes (``method=``, ``target=``, ...) still work, with a
    DeprecationWarning that shows the new call.
    """
    if before_recipes:
        config, options, budget = from_keywords(config, options, budget, before_recipes, "quantize")
    t_start = time.perf_counter()
    settings = Settings.of(config)
    job = _Job.open(Path(model), Path(output), calib, eval_data, settings, options, budget)
    if settings.weight_only is not None:
        quantized, record = _quantize_weight_only(job)
    else:
        quantized, record = _quantize_dynamic(job) if settings.dynamic else _quantize_static(job)
    if settings.config.fp16_rest:
        quantized, job.result.fp16_nodes = fp16.convert(quantized)
    quant_sess = _write(job, quantized, record)
    if options.compare:
        _compare(job, quant_sess)
    job.result.seconds = time.perf_counter() - t_start
    return job.result


@dataclass
class _Job:
    """One call's state as it goes through the stages: its settings, model, data and the result so far."""

    settings: Settings
    options: Options
    budget: Budget | None
    model: stages.Model
    data: stages.Data
    result: QuantizeResult
    held: Any = None  # the held-out samples (a FeedSource) when no evaluation data was given

    @classmethod
    def open(cls, model_path, output, calib, eval_data, settings, options, budget) -> _Job:
        """Check the options and every path, then open the model and the data (the first stages)."""
        ranges_path = ranges_path_for(output)
        check_outputs(
            {"output": output, "the ranges file": ranges_path, "trt_cache": options.trt_cache},
            {"model": model_path, "calib": calib, "eval_data": eval_data},
        )
        _check_options(settings, options, budget, calib)
        model = stages.open_model(model_path, settings, options.batch_size)
        data = stages.open_data(model, calib, eval_data, options)
        target = DEFAULT_TARGET if settings.dynamic else settings.target.name
        method = "weight-only" if settings.weight_only is not None else settings.method
        result = QuantizeResult(output, ranges_path, target, method, settings.dynamic, [], [])
        result.batch_size, result.fused, result.format = model.batch, dict(model.fused), settings.format
        return cls(settings, options, budget, model, data, result)


def _check_options(settings: Settings, options: Options, budget: Budget | None, calib: Any) -> None:
    """The options that contradict each other, each named, before any work."""
    if settings.weight_only is not None:
        _check_weight_only(settings, options, budget, calib)
        return
    if options.accuracy_level:
        raise QuantizeError("--accuracy-level sets MatMulNBits' compute type: it needs --weight-only")
    if fp8.is_fp8(settings.format) and options.trt_cache is not None:
        raise QuantizeError(f"--trt-cache writes INT8 scales (amax / 127) for implicit INT8; --format "
                            f"{settings.format} is explicit FP8 Q/DQ only (drop --trt-cache)")  # fmt: skip
    if settings.dynamic and options.trt_cache is not None:
        raise QuantizeError("--trt-cache needs static calibration; it cannot be combined with --dynamic")
    if budget is not None and settings.dynamic:
        raise QuantizeError(
            "automatic mixed precision searches static quantization; it cannot be combined with dynamic"
        )
    if not settings.dynamic and calib is None:
        raise QuantizeError("static quantization needs calibration data (--calib); or use --dynamic")


def _check_weight_only(settings: Settings, options: Options, budget: Budget | None, calib: Any) -> None:
    if settings.weight_only.act_order and calib is None:
        raise QuantizeError("--act-order orders GPTQ's columns, and GPTQ needs calibration data: give --calib")
    if options.trt_cache is not None:
        raise QuantizeError("--trt-cache writes activation scales; weight-only quantization has none (drop it)")
    if budget is not None:
        raise QuantizeError("automatic mixed precision (--max-drop) searches static quantization, not weight-only")
    if settings.weight_only.needs_data and calib is None:
        name = "AWQ" if settings.weight_only.awq else "GPTQ"
        raise QuantizeError(
            f"{name} rounding fits the weights to calibration data: give --calib, or --rounding nearest"
        )


def _quantize_weight_only(job: _Job) -> tuple[onnx.ModelProto, dict]:
    """Weight-only quantization (:mod:`lowbit.onnx.weight_only`): prepare the float model, round the weights
    (GPTQ when there is calibration data, unless the recipe says nearest), write MatMulNBits or DequantizeLinear."""
    settings, options, result, model = job.settings, job.options, job.result, job.model
    wo = settings.weight_only
    rounding = wo.rounding or ("gptq" if job.data.calib is not None else "nearest")
    feeds, total = None, None
    if job.data.calib is not None:
        wanted_holdout = options.compare and job.data.eval is None
        chosen = sampling.split(job.data.calib, options.max_samples, HOLDOUT if wanted_holdout else 0)
        job.held = chosen.held
        result.held_out_samples = chosen.held.num_samples if chosen.held is not None else 0
        result.samples_note = chosen.describe() if rounding != "nearest" else ""
        result.calibration_samples = chosen.calib.num_samples or 0
        feeds, total = (lambda: chosen.calib.batches(model.batch)), len(chosen.calib.batches(model.batch)) or None
    chosen_weights = {layer.weight for layer in weight_only.linears(model.graph, settings)[0]}
    prepared, result.smoothing = weight_only.prepare(model.float_model, wo, feeds, total=total,
                                                     progress=options.progress, only=chosen_weights)  # fmt: skip
    layers, skipped = weight_only.linears(Graph(prepared), settings)
    if not layers:
        raise QuantizeError(
            "nothing to quantize: no MatMul or Gemm with a constant 2-D weight is left after exclusions"
        )
    t0 = time.perf_counter()
    codes = "gptq" if rounding in ("gptq", "awq+gptq") else "nearest"
    rounded = weight_only.round_weights(prepared, layers, wo, codes, feeds, total=total, progress=options.progress)
    result.calibration_seconds = time.perf_counter() - t0
    quantized = weight_only.write(prepared, layers, rounded.blocks, wo, options.accuracy_level)
    result.quantized_nodes = [job.model.graph.node_name(layer.node) for layer in layers]
    result.excluded_nodes, result.layers = skipped, len(layers)
    result.rounding, result.rounded_layers = rounding, rounded.gptq_layers
    result.hessian_passes, result.peak_hessian_bytes = rounded.passes, rounded.peak_hessian_bytes
    result.weight_only = weight_only.describe(wo, options.accuracy_level)
    result.batch_size = result.calibration_batch = model.batch
    record = {"weight_only": {"bits": wo.bits, "group_size": wo.group_size, "symmetric": wo.symmetric,
                              "layout": wo.layout, "rounding": rounding, "act_order": wo.act_order,
                              "accuracy_level": options.accuracy_level}}  # fmt: skip
    return quantized, record


def _quantize_dynamic(job: _Job) -> tuple[onnx.ModelProto, dict]:
    s, result = job.settings, job.result
    quantized, dplan = quantize_dynamic(
        job.model.float_model,
        exclude=s.exclude,
        exclude_ops=s.exclude_ops,
        per_channel=s.per_channel,
        weight_only_rnn=s.config.weight_only_rnn,
    )
    result.quantized_nodes, result.excluded_nodes = dplan.quantized_nodes, dplan.excluded_nodes
    result.layers = len(dplan.quantized_nodes)
    if not dplan.quantized_nodes:
        raise QuantizeError(
            "nothing to quantize dynamically: the model has no MatMul/Gemm with a constant 2-D weight, no "
            "LSTM/GRU/RNN with constant weights and no embedding table (or --exclude left none)"
        )
    return quantized, {"activations": {}}


def _quantize_static(job: _Job) -> tuple[onnx.ModelProto, dict]:
    """Split the samples, calibrate once, [search mixed precision], build, store tables, record the ranges."""
    settings, options, result, model = job.settings, job.options, job.result, job.model
    wanted_holdout = options.compare and job.data.eval is None
    chosen = sampling.split(job.data.calib, options.max_samples, HOLDOUT if wanted_holdout else 0)
    job.held = chosen.held
    result.held_out_samples = chosen.held.num_samples if chosen.held is not None else 0
    result.samples_note = chosen.describe()
    if not chosen.calib.num_samples and chosen.total is not None:
        raise DataError(f"{job.data.calib.description}: no samples left for calibration")
    if settings.config.smoothquant is not None:
        result.smoothing = _smooth(job, chosen.calib)
    full = plan_for(model.graph, settings)
    if not full.quantized_nodes and not full.bodies:
        renamed = [path for part in full.walk() for path in part.renamed_bodies]
        why = f" (the bodies {', '.join(renamed)} reuse tensor names of the model)" if renamed else ""
        raise QuantizeError(
            f"nothing to quantize: no node of a supported type (Conv, Gemm, MatMul, ...) is left after exclusions{why}"
        )
    result.calibration_batch = stages.calibration_batch(model, options)[0]
    every_tensor = options.trt_cache is not None or job.budget is not None
    calibrated = stages.calibrate(model, settings, chosen.calib, options, every_tensor=every_tensor)
    result.calibration_seconds = calibrated.seconds
    if calibrated.refinement is not None:
        result.refinement = calibrated.refinement.summary()
    known = chosen.calib.num_samples
    result.calibration_samples = known if known is not None else calibrated.batches * result.calibration_batch
    result.rounding, result.rounded_layers = settings.rounding, len(calibrated.codes)
    keep_float: list[str] = []
    if job.budget is not None:
        sample_feeds = (job.data.eval or job.held or chosen.calib).batches(model.batch, 0, HOLDOUT)
        layers = units(model.graph, full)
        result.mixed = stages.search(calibrated, layers, job.budget, sample_feeds, options.progress)
        keep_float = result.mixed.kept
    quantized, record = _build(job, calibrated, keep_float)
    _warn_few(result, wanted_holdout)
    return quantized, record


def _smooth(job: _Job, source) -> smoothing.Report:
    """SmoothQuant on the calibration samples, before calibration: the float model the later stages quantize
    becomes the smoothed one (:func:`lowbit.onnx.smoothing.smoothquant`; its float outputs are the same)."""
    model, settings, options = job.model, job.settings, job.options
    batch, run_model = stages.calibration_batch(model, options)
    batches = source.batches(batch)
    model.float_model, report = smoothing.smoothquant(
        model.float_model,
        batches,
        settings.config.smoothquant,
        activation=settings.activation,
        per_channel=settings.per_channel,
        total=len(batches) or None,
        progress=options.progress,
        run_model=run_model,
    )
    model.graph = Graph(model.float_model)
    return report


def _build(job: _Job, calibrated: Calibrated, keep_float: list[str]) -> tuple[onnx.ModelProto, dict]:
    """Build the model with ``keep_float`` in float, store the target's int8 tables, record the ranges and write
    the TensorRT cache if asked."""
    settings, result = job.settings, job.result
    built = calibrated.build(keep_float=keep_float)
    quantized, plan, result.bias_corrections = built.model, built.plan, built.bias_corrections
    rewrite.without_dead_quantizers(quantized)
    _warn_unseen(result, plan_for(job.model.graph, settings, keep_float), plan)
    result.quantized_nodes = [*plan.quantized_nodes, *plan.body_nodes()]
    result.excluded_nodes = plan.excluded_nodes
    result.layers = len(units(job.model.graph, plan))
    if settings.target.int8_tables:
        # Embedding tables feed no compute op, so the plan leaves them in float; stored as int8 they take
        # more than half off a transformer's file (all-MiniLM-L6-v2: 59 MB -> 23 MB).
        quantized, tables = quantize_dynamic(
            quantized, exclude=settings.exclude, exclude_ops=settings.exclude_ops, tables_only=True
        )
        result.quantized_nodes += tables.quantized_nodes
        result.layers += len(tables.quantized_nodes)
    act_ranges = calibrated.ranges(plan.calibrated)
    record = _record(plan, act_ranges, calibrated.scales)
    if calibrated.refinement is not None:
        record["easyquant"] = calibrated.refinement.to_dict()
    if result.smoothing is not None:
        record["smoothquant"] = result.smoothing.to_dict()
    if job.options.trt_cache is not None:
        write_trt_cache(job.options.trt_cache, _trt_amax(calibrated, plan, act_ranges))
        result.trt_cache = job.options.trt_cache
    return quantized, record


def _warn_unseen(result: QuantizeResult, full: placement.Plan, built: placement.Plan) -> None:
    """Say which If/Loop/Scan bodies stayed in float because calibration never ran them."""
    unseen = sorted(set(full.body_paths()) - set(built.body_paths()))
    if unseen:
        stays = "it stays" if len(unseen) == 1 else "they stay"
        result.warnings.append(
            f"{', '.join(unseen)} never ran on the calibration data, so {stays} in float: give samples that take "
            "every branch"
        )
    renamed = [path for part in full.walk() for path in part.renamed_bodies]
    if renamed:
        result.warnings.append(
            f"{', '.join(renamed)} stays in float: it names a tensor as another part of the model does, and lowbit "
            "keeps ranges by name (give the body's tensors their own names)"
        )


def _trt_amax(calibrated: Calibrated, plan: placement.Plan, act_ranges) -> dict[str, float]:
    """Implicit INT8 wants every tensor's symmetric amax; tensors with symmetric Q/DQ ranges keep theirs. With
    power-of-two scales each amax is raised to 127 times a power of two."""
    cals = calibrated.calibrators
    planned = {t: cals[t] for t in plan.calibrated}
    symmetric = act_ranges if plan.activation.symmetric else collect.ranges(planned, symmetric=True)
    others = collect.ranges({t: c for t, c in cals.items() if t not in planned}, symmetric=True)
    amax = {t: r[1] for t, r in others.items()}
    amax.update({t: symmetric[root][1] for part in plan.walk() for t, root in part.activations.items()})
    if plan.activation.scale_kind == "pow2":  # the cache's scales (amax / 127) are the same powers of two
        grid = QuantSpec(scale_kind="pow2")
        amax = {t: float(qparams(-a, a, grid)[0]) * 127.0 for t, a in amax.items()}
    return amax


def _warn_few(result: QuantizeResult, wanted_holdout: bool) -> None:
    """Warn (``warnings.warn``, and in ``result.warnings``) when the calibration set is too small to trust."""
    n = result.calibration_samples
    if n < FEW_SAMPLES:
        result.warnings.append(
            f"only {n} calibration samples: ranges from so few are noisy; a few hundred representative samples "
            "are usual"
        )
    if wanted_holdout and not result.held_out_samples:
        result.warnings.append(
            f"{n} samples are too few to hold any out of calibration (at least 5 are needed), so FP32 and INT8 are "
            "not compared: give evaluation data (--eval)"
        )
    for text in result.warnings:
        warnings.warn(text, stacklevel=4)


def _write(job: _Job, quantized: onnx.ModelProto, record: dict) -> Any:
    """Check the quantized model, load it in ONNX Runtime, then write it and its ranges file (both atomically);
    returns its session."""
    result = job.result
    _copy_metadata(job.model.original, quantized)
    try:
        onnx.checker.check_model(quantized, full_check=False)
    except onnx.checker.ValidationError as exc:  # a bug in lowbit, not in the user's input
        raise LowbitError(f"internal error: the quantized model does not pass onnx.checker: {exc}") from exc
    quant_sess = session(quantized)
    save_model(quantized, result.output)
    record.update(
        {
            "lowbit": lowbit.__version__,
            "model": str(job.model.path),
            "target": result.target,
            "method": result.method,
            "dynamic": result.dynamic,
            "quantized_nodes": result.quantized_nodes,
            "excluded_nodes": result.excluded_nodes,
            "recipe": to_dict(job.settings.config),
        }
    )
    atomic_write_text(result.ranges_path, json.dumps(record, indent=1) + "\n")
    return quant_sess


def _compare(job: _Job, quant_sess: Any) -> None:
    """File sizes, output agreement on the evaluation or held-out samples (if any) and latency on a batch of
    them (or of the calibration data)."""
    result, model, progress = job.result, job.model, job.options.progress
    held = job.data.eval or job.held
    sample_source = held or job.data.calib
    float_sess = session(model.original)  # the file as given: what the user compares with
    result.sizes = {"fp32": file_size(model.path), "int8": file_size(result.output)}
    if held is not None:
        result.agreement = compare.agreement(float_sess, quant_sess, held.batches(model.batch), progress=progress)
    sample = next(iter(sample_source.batches(model.batch, 0, model.batch)), None) if sample_source else None
    if sample is not None:
        sessions = {"fp32": float_sess, "int8": quant_sess}
        result.latency = compare.latencies(sessions, sample, model.inputs, progress=progress)
        result.untimed = compare.untimed(model.inputs)


def _record(plan: placement.Plan, ranges, scales) -> dict:
    """The ranges file's activations (inside If/Loop/Scan bodies too) and weights (with the scales calibration
    chose for those of the main graph)."""
    acts, weights = {}, {}
    for part in plan.walk():
        qp = rewrite.activation_qparams(part, ranges)
        for tensor, root in part.activations.items():
            p = qp[tensor]
            lo, hi = ranges[root]
            acts[tensor] = {
                "lo": lo,
                "hi": hi,
                "scale": float(p.scale),
                "zero_point": int(p.zero_point),
                **({"shares_range_of": root} if root != tensor else {}),
            }
        for name, axis in part.weights.items():
            scale = scales.get(name) if part is plan else None
            weights[name] = {"axis": axis, **({} if scale is None else {"scale": np.ravel(scale).tolist()})}
    return {"activations": acts, "weights": weights}


def _copy_metadata(original: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    quantized.producer_name = "lowbit"
    quantized.producer_version = lowbit.__version__
    quantized.doc_string = original.doc_string
    quantized.model_version = original.model_version
