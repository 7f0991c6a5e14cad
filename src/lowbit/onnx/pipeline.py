"""``quantize``: an ONNX model in, a quantized ONNX model out (static with calibration, or dynamic).

from lowbit.onnx.pipeline import quantize
result = quantize("model.onnx", "model_int8.onnx", calib="calib.npz")
print(result.table())
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from tqdm.auto import tqdm

import lowbit
from lowbit import calib as calib_registry
from lowbit import sampling
from lowbit._io import atomic_write_text
from lowbit._table import format_table
from lowbit.data import DataError, FeedSource, InputSpec, open_feeds
from lowbit.errors import LowbitError
from lowbit.onnx import collect, compare, fp16, placement, rewrite
from lowbit.onnx.calibration import calibrate_model, target_options, units  # noqa: F401 (public here too)
from lowbit.onnx.dynamic import quantize_dynamic
from lowbit.onnx.graph import Graph
from lowbit.onnx.model import (
    batch_size_for,
    file_size,
    free_batch,
    input_specs,
    load_model,
    preprocess,
    save_model,
    session,
)
from lowbit.paths import check_outputs, ranges_path_for
from lowbit.trt_cache import write_trt_cache

# Default calibration method per target. MSE searches the grid the target uses. TensorRT's entropy method, faithful
# to TensorRT, cuts spiky tensors hard: ccexam MNISTNet loses 11 points with it (99.83% -> 88.8%, the input's
# background spike sets amax 0.42 of 2.82), none with mse or minmax (benchmarks/onnx_bench.py).
DEFAULT_METHOD = {"trt": "mse", "ort": "mse"}
ROUNDINGS = ("gptq", "nearest")
HOLDOUT = 64  # samples kept apart for the float vs quantized comparison when no eval data is given


class QuantizeError(LowbitError, ValueError):
    """Options that do not fit together or a model that cannot be quantized as asked."""


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
    gptq_layers: int = 0
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

    def table(self) -> str:
        """FP32 vs INT8: file size, latency at batch 1 and 8, and output agreement."""
        rows = []
        for name in ("fp32", "int8"):
            lat = self.latency.get(name, {})
            row = [name.upper(), f"{self.sizes.get(name, 0) / 1e6:.2f} MB"]
            row += ["-" if lat.get(b) is None else f"{lat[b]:.2f} ms" for b in (1, 8)]
            rows.append(row)
        if self.sizes.get("fp32") and self.sizes.get("int8"):
            ratio = self.sizes["int8"] / self.sizes["fp32"]
            speed = [self.latency.get("fp32", {}).get(b) and self.latency.get("int8", {}).get(b) for b in (1, 8)]
            speed_cells = [_speedup(self.latency["fp32"][b], self.latency["int8"][b]) if ok else "-"
                           for b, ok in zip((1, 8), speed, strict=True)]  # fmt: skip
            rows.append(["INT8 / FP32", f"x{ratio:.3f}", *speed_cells])
        text = format_table(["model", "file size", "latency b=1", "latency b=8"], rows, "lrrr")
        if self.target == "trt" and self.latency:
            text += "\n(latency on ONNX Runtime CPU; a --target trt model is laid out for TensorRT, not for this)"
        for b, why in self.untimed.items():
            text += f"\n(- at batch {b}: {why})"
        if self.agreement is not None:
            text += "\n" + _agreement_line(self.agreement, "held-out" if self.held_out_samples else "evaluation")
        return text

    def to_dict(self) -> dict[str, Any]:
        skip = ("agreement", "mixed")
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if k not in skip}
        out["agreement"] = None if self.agreement is None else self.agreement.to_dict()
        out["mixed"] = None if self.mixed is None else self.mixed.to_dict()
        return out


def _agreement_line(a: compare.Agreement, kind: str) -> str:
    """One line of output agreement; NaN/Inf outputs are counted apart and never averaged in."""
    if a.nonfinite:
        where = "the FP32 model's too" if a.nonfinite_reference else "FP32's are finite"
        warn = f"; WARNING: the INT8 output is NaN/Inf on {a.nonfinite} of {a.samples} samples ({where})"
    else:
        warn = ""
    if a.cosine is None:
        return f"output agreement on {a.samples} {kind} samples: none is finite{warn}"
    top1 = "" if a.top1 is None else f", top-1 agreement {a.top1 * 100:.2f}%"
    return (
        f"output agreement on {a.finite} {kind} samples: cosine {a.cosine:.5f}, max abs error "
        f"{a.max_abs_error:.4g} (in the output's units){top1}{warn}"
    )


def _speedup(before: float, after: float) -> str:
    ratio = before / after
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


FEW_SAMPLES = 32  # fewer calibration samples than this get a warning: their ranges are noisy


def quantize(
    model: str | os.PathLike,
    output: str | os.PathLike,
    calib: Any = None,
    *,
    method: str | None = None,
    method_options: Mapping[str, Any] | None = None,
    target: str = "ort",
    per_channel: bool = True,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    dynamic: bool = False,
    weight_only_rnn: bool = False,
    bias_correction: bool = True,
    rounding: str = "gptq",
    fp16_rest: bool = False,
    trt_cache: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_samples: int = 512,
    eval_data: Any = None,
    image_options: Any = None,
    compare_models: bool = True,
    progress: bool = True,
    metric: Any = None,
    max_drop: float | None = None,
) -> QuantizeResult:
    """Quantize the ONNX model at ``model`` and write it to ``output``; return what was done and measured.

    Static (default): activations calibrated on ``calib`` (see :func:`lowbit.data.open_feeds` for what it can
    be) with ``method`` (default: :data:`DEFAULT_METHOD`, ``mse``), Q/DQ placed for
    ``target``. ``dynamic=True``: MatMul/Gemm/LSTM weights to int8, activation scales at run time, no ``calib``;
    ``weight_only_rnn`` also stores GRU/RNN weights as int8 (smaller, slower: no integer kernel for them).
    Nodes whose name matches a regex in ``exclude`` or whose op type is in ``exclude_ops`` stay in float (a regex
    or op type that matches nothing is an error).
    ``bias_correction`` (static only) moves each Conv/Gemm bias by the mean shift weight rounding causes on the
    calibration data (:mod:`lowbit.onnx.bias_correction`). ``rounding`` (static only): ``"gptq"`` chooses the
    weights' int8 codes for the least output error on the calibration data (:mod:`lowbit.onnx.gptq`),
    ``"nearest"`` rounds each weight to its nearest code. ``fp16_rest`` runs every node outside the quantizers
    in float16 (:mod:`lowbit.onnx.fp16`), as TensorRT runs INT8 + FP16.
    The chosen ranges go to ``<output stem>.ranges.json``; ``trt_cache`` also writes TensorRT's calibration cache.
    With ``compare_models``, latency and output agreement (on all of ``eval_data``, or on up to 64 samples held
    out of ``calib``) are measured. Calibration uses at most ``max_samples`` samples; when the data has more, or
    some are held out, both sets are a seeded spread over the whole data (:func:`lowbit.sampling.split`).
    ``metric`` (a :class:`lowbit.onnx.metrics.Metric`) and ``max_drop``: automatic mixed precision. The layers are
    ranked by their own sensitivity (:func:`lowbit.onnx.analyze.layer_sensitivity`, on up to 64 samples of
    ``eval_data`` or held out of ``calib``) and the most sensitive are kept in float, fewest first, until the
    metric drops by at most ``max_drop`` (:func:`lowbit.onnx.mixed.search`); ``result.mixed`` tells the steps.

    Every output path is checked against the model and the data (and made sure to be writable), and the
    evaluation data is read through once, before any work: nothing is written when an option or file is wrong.
    """
    t_start = time.perf_counter()
    model_path, output = Path(model), Path(output)
    trt_cache = Path(trt_cache) if trt_cache is not None else None
    ranges_path = ranges_path_for(output)
    check_outputs(
        {"output": output, "the ranges file": ranges_path, "trt_cache": trt_cache},
        {"model": model_path, "calib": calib, "eval_data": eval_data},
    )
    _check_options(target, dynamic, trt_cache, metric, max_drop, calib, rounding, max_samples, batch_size)
    method = None if dynamic else (method or DEFAULT_METHOD[target])
    if method is not None and method not in calib_registry.available():
        raise QuantizeError(f"unknown method {method!r}; methods: {', '.join(calib_registry.available())}")

    original = load_model(model_path)
    float_model = preprocess(original)
    placement.check_exclusions(Graph(float_model), exclude, exclude_ops)
    inputs = tuple(InputSpec(*s) for s in input_specs(float_model))
    batch = batch_size_for(inputs, batch_size)
    eval_source = (
        open_feeds(eval_data, inputs, image_options=image_options, role="evaluation data")
        if eval_data is not None
        else None
    )
    source = open_feeds(calib, inputs, image_options=image_options) if calib is not None else None
    if eval_source is not None:
        _read_through(eval_source, batch, "evaluation data", progress)
    result = QuantizeResult(output, ranges_path, "ort" if dynamic else target, method, dynamic, [], [])
    result.batch_size = batch

    if dynamic:
        quantized, record = _quantize_dynamic(float_model, result, exclude, exclude_ops, per_channel, weight_only_rnn)
        held = None
    else:
        chosen = sampling.split(source, max_samples, HOLDOUT if compare_models and eval_source is None else 0)
        held = chosen.held
        result.held_out_samples = held.num_samples if held is not None else 0
        result.samples_note = chosen.describe()
        if not chosen.calib.num_samples and chosen.total is not None:
            raise DataError(f"{source.description}: no samples left for calibration")
        static = _Static(float_model, target, method, method_options, exclude, exclude_ops, per_channel)
        if batch == 1 < batch_size:  # a model fixed at batch 1 calibrates through a copy that takes batch_size
            static.run_model = free_batch(float_model, batch_size)
        result.calibration_batch = batch_size if static.run_model is not None else batch
        sample_feeds = (eval_source or held or chosen.calib).batches(batch, 0, HOLDOUT)
        quantized, record = static.run(
            chosen.calib, result.calibration_batch, result, bias_correction=bias_correction, rounding=rounding,
            trt_cache=trt_cache, metric=metric, max_drop=max_drop, sample_feeds=sample_feeds, progress=progress,
        )  # fmt: skip
        _warn_few(result, compare_models and eval_source is None)

    if fp16_rest:
        quantized, result.fp16_nodes = fp16.convert(quantized)
    quant_sess = _write(original, quantized, record, result, model_path)
    if compare_models:
        compared = eval_source or held
        _compare(result, float_model, quant_sess, model_path, compared, compared or source, inputs, batch, progress)
    result.seconds = time.perf_counter() - t_start
    return result


def _write(original, quantized, record, result, model_path) -> Any:
    """Check the quantized model, load it in ONNX Runtime, then write it and its ranges file (both atomically);
    returns its session."""
    _copy_metadata(original, quantized)
    try:
        onnx.checker.check_model(quantized, full_check=False)
    except onnx.checker.ValidationError as exc:  # a bug in lowbit, not in the user's input
        raise LowbitError(f"internal error: the quantized model does not pass onnx.checker: {exc}") from exc
    quant_sess = session(quantized)
    save_model(quantized, result.output)
    record.update(
        {
            "lowbit": lowbit.__version__,
            "model": str(model_path),
            "target": result.target,
            "method": result.method,
            "dynamic": result.dynamic,
            "quantized_nodes": result.quantized_nodes,
            "excluded_nodes": result.excluded_nodes,
        }
    )
    atomic_write_text(result.ranges_path, json.dumps(record, indent=1) + "\n")
    return quant_sess


def _check_options(target, dynamic, trt_cache, metric, max_drop, calib, rounding, max_samples, batch_size) -> None:
    """The options that contradict each other or are out of range, each named, before any work."""
    if target not in placement.TARGETS:
        raise QuantizeError(f"unknown target {target!r}; targets are {', '.join(placement.TARGETS)}")
    if dynamic and trt_cache is not None:
        raise QuantizeError("--trt-cache needs static calibration; it cannot be combined with --dynamic")
    if (metric is None) != (max_drop is None):
        raise QuantizeError("automatic mixed precision needs both a metric and max_drop")
    if max_drop is not None and not max_drop >= 0:
        raise QuantizeError(f"max_drop must be 0 or more (the largest drop from FP32 allowed), got {max_drop}")
    if metric is not None and dynamic:
        raise QuantizeError(
            "automatic mixed precision searches static quantization; it cannot be combined with dynamic"
        )
    if not dynamic and calib is None:
        raise QuantizeError("static quantization needs calibration data (--calib); or use --dynamic")
    if rounding not in ROUNDINGS:
        raise QuantizeError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    for name, value in (("max_samples", max_samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise QuantizeError(f"{name} must be a positive integer, got {value!r}")


def _read_through(source: FeedSource, batch: int, what: str, progress: bool) -> None:
    """Read every batch of ``source`` once, so that data that does not fit the model (shape, dtype, NaN) is an
    error before anything is computed or written, not after."""
    batches = source.batches(batch)
    with tqdm(total=len(batches) or None, desc=f"checking {what}", unit="batch", disable=not progress,
              leave=False) as bar:  # fmt: skip
        for _ in batches:
            bar.update(1)


def _quantize_dynamic(float_model, result, exclude, exclude_ops, per_channel, weight_only_rnn):
    quantized, dplan = quantize_dynamic(
        float_model, exclude=exclude, exclude_ops=exclude_ops, per_channel=per_channel, weight_only_rnn=weight_only_rnn
    )
    result.quantized_nodes, result.excluded_nodes = dplan.quantized_nodes, dplan.excluded_nodes
    result.layers = len(dplan.quantized_nodes)
    if not dplan.quantized_nodes:
        raise QuantizeError(
            "nothing to quantize dynamically: the model has no MatMul/Gemm with a constant 2-D weight, no "
            "LSTM/GRU/RNN with constant weights and no embedding table (or --exclude left none)"
        )
    return quantized, {"activations": {}}


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
        warnings.warn(text, stacklevel=3)


class _Static:
    """Static quantization's stages: calibrate once, [search mixed precision], build, record the ranges."""

    def __init__(self, float_model, target, method, method_options, exclude, exclude_ops, per_channel):
        self.float_model, self.target, self.method, self.method_options = float_model, target, method, method_options
        self.exclude, self.exclude_ops, self.per_channel = exclude, exclude_ops, per_channel
        self.graph = Graph(float_model)
        self.run_model: onnx.ModelProto | None = None  # what calibration runs, when not float_model itself

    def run(self, calib_source, batch, result, *, bias_correction, rounding, trt_cache, metric, max_drop,
            sample_feeds, progress):  # fmt: skip
        plan = placement.plan(
            self.graph, self.target, exclude=self.exclude, exclude_ops=self.exclude_ops, per_channel=self.per_channel
        )
        if not plan.quantized_nodes:
            raise QuantizeError(
                "nothing to quantize: no node of a supported type (Conv, Gemm, MatMul, ...) is left after exclusions"
            )
        batches = calib_source.batches(batch)
        calibrated = calibrate_model(
            self.float_model,
            batches,
            target=self.target,
            method=self.method,
            method_options=self.method_options,
            exclude=self.exclude,
            exclude_ops=self.exclude_ops,
            per_channel=self.per_channel,
            bias_correction=bias_correction,
            rounding=rounding,
            samples=calib_source.num_samples,
            every_tensor=trt_cache is not None or metric is not None,
            total=len(batches) or None,
            progress=progress,
            run_model=self.run_model,
        )
        result.calibration_seconds = calibrated.seconds
        known = calib_source.num_samples
        result.calibration_samples = known if known is not None else calibrated.batches * batch
        result.gptq_layers = len(calibrated.codes)
        keep_float: list[str] = []
        if metric is not None:
            layers = units(self.graph, plan)
            result.mixed = _search(calibrated, layers, metric, max_drop, sample_feeds, progress)
            keep_float = result.mixed.kept
        built = calibrated.build(keep_float=keep_float)
        quantized, plan, result.bias_corrections = built.model, built.plan, built.bias_corrections
        result.quantized_nodes, result.excluded_nodes = list(plan.quantized_nodes), plan.excluded_nodes
        result.layers = len(units(self.graph, plan))
        if self.target == "ort":
            # Embedding tables feed no compute op, so the plan leaves them in float; stored as int8 they take
            # more than half off a transformer's file (all-MiniLM-L6-v2: 59 MB -> 23 MB).
            quantized, tables = quantize_dynamic(
                quantized, exclude=self.exclude, exclude_ops=self.exclude_ops, tables_only=True
            )
            result.quantized_nodes += tables.quantized_nodes
            result.layers += len(tables.quantized_nodes)
        act_ranges = calibrated.ranges(plan.calibrated)
        record = _record(plan, rewrite.activation_qparams(plan, act_ranges), act_ranges)
        if trt_cache is not None:
            write_trt_cache(trt_cache, self._trt_amax(calibrated, plan, act_ranges))
            result.trt_cache = trt_cache
        return quantized, record

    def _trt_amax(self, calibrated, plan, act_ranges) -> dict[str, float]:
        """Implicit INT8 wants every tensor's symmetric amax; for --target trt the Q/DQ tensors keep theirs."""
        cals = calibrated.calibrators
        planned = {t: cals[t] for t in plan.calibrated}
        symmetric = act_ranges if self.target == "trt" else collect.ranges(planned, symmetric=True)
        others = collect.ranges({t: c for t, c in cals.items() if t not in planned}, symmetric=True)
        amax = {t: r[1] for t, r in others.items()}
        amax.update({t: symmetric[root][1] for t, root in plan.activations.items()})
        return amax


def _search(calibrated, layers, metric, max_drop, sample_feeds, progress):
    from lowbit.onnx import mixed
    from lowbit.onnx.analyze import layer_sensitivity

    errors = layer_sensitivity(calibrated, layers, sample_feeds, progress=progress)
    ranked = sorted(layers, key=lambda name: (errors[name][1].sqnr_db, errors[name][1].cosine))
    return mixed.search(calibrated, ranked, metric, max_drop, progress=progress)


def _compare(result, float_model, quant_sess, model_path, held, sample_source, inputs, batch, progress) -> None:
    """File sizes, output agreement on ``held`` (the evaluation or held-out samples, if any) and latency on a batch
    of ``sample_source``."""
    float_sess = session(float_model)
    result.sizes = {"fp32": file_size(model_path), "int8": file_size(result.output)}
    if held is not None:
        result.agreement = compare.agreement(float_sess, quant_sess, held.batches(batch), progress=progress)
    sample = next(iter(sample_source.batches(batch, 0, batch)), None) if sample_source is not None else None
    if sample is not None:
        sessions = {"fp32": float_sess, "int8": quant_sess}
        result.latency = compare.latencies(sessions, sample, inputs, progress=progress)
        result.untimed = compare.untimed(inputs)


def _record(plan: placement.Plan, qp: Mapping[str, rewrite.QParams], ranges) -> dict:
    acts = {}
    for tensor, root in plan.activations.items():
        p = qp[tensor]
        lo, hi = ranges[root]
        acts[tensor] = {
            "lo": lo,
            "hi": hi,
            "scale": float(p.scale),
            "zero_point": int(p.zero_point),
            **({"shares_range_of": root} if root != tensor else {}),
        }
    weights = {name: {"axis": axis} for name, axis in plan.weights.items()}
    return {"activations": acts, "weights": weights}


def _copy_metadata(original: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    quantized.producer_name = "lowbit"
    quantized.producer_version = lowbit.__version__
    quantized.doc_string = original.doc_string
    quantized.model_version = original.model_version
