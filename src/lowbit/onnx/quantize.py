"""``quantize``: an ONNX model in, a quantized ONNX model out (static with calibration, or dynamic).

from lowbit.onnx.quantize import quantize
result = quantize("model.onnx", "model_int8.onnx", calib="calib.npz")
print(result.table())
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

import lowbit
from lowbit import calib as calib_registry
from lowbit._io import atomic_write_text
from lowbit._table import format_table
from lowbit.data import DataError, FeedSource, InputSpec, open_feeds
from lowbit.errors import LowbitError
from lowbit.onnx import calibrate, compare, fp16, placement, rewrite
from lowbit.onnx.calibrated import calibrate_model, target_options, units  # noqa: F401 (public here too)
from lowbit.onnx.dynamic import quantize_dynamic
from lowbit.onnx.graph import Graph
from lowbit.onnx.model import batch_size_for, file_size, input_specs, load_model, preprocess, save_model, session
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
        a = self.agreement
        if a is not None:
            top1 = "" if a.top1 is None else f", top-1 agreement {a.top1 * 100:.2f}%"
            text += (
                f"\noutput agreement on {a.samples} held-out samples: cosine {a.cosine:.5f}, "
                f"max abs error {a.max_abs_error:.4g}{top1}"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        skip = ("agreement", "mixed")
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if k not in skip}
        out["agreement"] = None if self.agreement is None else self.agreement.to_dict()
        out["mixed"] = None if self.mixed is None else self.mixed.to_dict()
        return out


def _speedup(before: float, after: float) -> str:
    ratio = before / after
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _check_paths(model: Path, outputs: Sequence[Path | None]) -> None:
    for out in outputs:
        if out is not None and out.resolve() == model.resolve():
            raise QuantizeError(f"refusing to overwrite the input model {model}: choose another output path")


def ranges_path_for(output: Path) -> Path:
    """``model_int8.onnx`` -> ``model_int8.ranges.json``."""
    return output.with_name(output.stem + ".ranges.json")


def split_samples(
    source: FeedSource, max_samples: int, holdout: bool
) -> tuple[tuple[int, int | None], tuple[int, int | None]]:
    """Sample ranges (start, stop) for calibration and for the held-out comparison."""
    n = source.num_samples
    if n is None:
        return (0, max_samples), (max_samples, max_samples + HOLDOUT if holdout else max_samples)
    h = min(HOLDOUT, n // 5) if holdout else 0
    stop = min(max_samples, n - h)
    return (0, stop), (n - h, n)


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
    Nodes whose name matches a regex in ``exclude`` or whose op type is in ``exclude_ops`` stay in float.
    ``bias_correction`` (static only) moves each Conv/Gemm bias by the mean shift weight rounding causes on the
    calibration data (:mod:`lowbit.onnx.bias_correction`). ``rounding`` (static only): ``"gptq"`` chooses the
    weights' int8 codes for the least output error on the calibration data (:mod:`lowbit.onnx.gptq`),
    ``"nearest"`` rounds each weight to its nearest code. ``fp16_rest`` runs every node outside the quantizers
    in float16 (:mod:`lowbit.onnx.fp16`), as TensorRT runs INT8 + FP16.
    The chosen ranges go to ``<output stem>.ranges.json``; ``trt_cache`` also writes TensorRT's calibration cache.
    With ``compare_models``, latency and output agreement (on all of ``eval_data``, or on up to 64 samples held
    out of ``calib``) are measured.
    ``metric`` (a :class:`lowbit.onnx.metrics.Metric`) and ``max_drop``: automatic mixed precision. The layers are
    ranked by their own sensitivity (:func:`lowbit.onnx.analyze.layer_sensitivity`, on up to 64 samples of
    ``eval_data`` or held out of ``calib``) and the most sensitive are kept in float, fewest first, until the
    metric drops by at most ``max_drop`` (:func:`lowbit.onnx.mixed.search`); ``result.mixed`` tells the steps.
    """
    model_path, output = Path(model), Path(output)
    trt_cache = Path(trt_cache) if trt_cache is not None else None
    ranges_path = ranges_path_for(output)
    _check_paths(model_path, [output, ranges_path, trt_cache])
    if target not in placement.TARGETS:
        raise QuantizeError(f"unknown target {target!r}; targets are {', '.join(placement.TARGETS)}")
    if dynamic and trt_cache is not None:
        raise QuantizeError("--trt-cache needs static calibration; it cannot be combined with --dynamic")
    if (metric is None) != (max_drop is None):
        raise QuantizeError("automatic mixed precision needs both a metric and max_drop")
    if metric is not None and dynamic:
        raise QuantizeError(
            "automatic mixed precision searches static quantization; it cannot be combined with dynamic"
        )
    if not dynamic and calib is None:
        raise QuantizeError("static quantization needs calibration data (--calib); or use --dynamic")
    if rounding not in ROUNDINGS:
        raise QuantizeError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    if max_samples < 1 or batch_size < 1:
        raise QuantizeError("max_samples and batch_size must be positive")
    method = None if dynamic else (method or DEFAULT_METHOD[target])
    if method is not None and method not in calib_registry.available():
        raise QuantizeError(f"unknown method {method!r}; methods: {', '.join(calib_registry.available())}")

    original = load_model(model_path)
    float_model = preprocess(original)
    inputs = tuple(InputSpec(*s) for s in input_specs(float_model))
    batch = batch_size_for(inputs, batch_size)
    eval_source = open_feeds(eval_data, inputs, image_options=image_options) if eval_data is not None else None
    source = open_feeds(calib, inputs, image_options=image_options) if calib is not None else None
    result = QuantizeResult(output, ranges_path, "ort" if dynamic else target, method, dynamic, [], [])

    if dynamic:
        quantized, dplan = quantize_dynamic(
            float_model,
            exclude=exclude,
            exclude_ops=exclude_ops,
            per_channel=per_channel,
            weight_only_rnn=weight_only_rnn,
        )
        result.quantized_nodes, result.excluded_nodes = dplan.quantized_nodes, dplan.excluded_nodes
        if not dplan.quantized_nodes:
            raise QuantizeError(
                "nothing to quantize dynamically: the model has no MatMul/Gemm with a constant 2-D weight, no "
                "LSTM/GRU/RNN with constant weights and no embedding table (or --exclude left none)"
            )
        record: dict[str, Any] = {"activations": {}}
    else:
        graph = Graph(float_model)
        plan = placement.plan(graph, target, exclude=exclude, exclude_ops=exclude_ops, per_channel=per_channel)
        if not plan.quantized_nodes:
            raise QuantizeError(
                "nothing to quantize: no node of a supported type (Conv, Gemm, MatMul, ...) is left after exclusions"
            )
        cal_range, held = split_samples(source, max_samples, compare_models and eval_source is None)
        if cal_range[1] is not None and cal_range[1] <= cal_range[0]:
            raise DataError(f"{source.description}: no samples left for calibration")
        batches = source.batches(batch, *cal_range)
        calibrated = calibrate_model(
            float_model,
            batches,
            target=target,
            method=method,
            method_options=method_options,
            exclude=exclude,
            exclude_ops=exclude_ops,
            per_channel=per_channel,
            bias_correction=bias_correction,
            rounding=rounding,
            samples=None if cal_range[1] is None else cal_range[1] - cal_range[0],
            every_tensor=trt_cache is not None or metric is not None,
            total=len(batches) or None,
            progress=progress,
        )
        result.calibration_seconds = calibrated.seconds
        result.calibration_samples = cal_range[1] if source.num_samples is not None else calibrated.batches * batch
        result.gptq_layers = len(calibrated.codes)
        keep_float: list[str] = []
        if metric is not None:
            from lowbit.onnx import mixed
            from lowbit.onnx.analyze import layer_sensitivity

            sample_feeds = (
                eval_source.batches(batch, 0, HOLDOUT) if eval_source is not None else source.batches(batch, *held)
            )
            if held[1] is not None and held[1] <= held[0] and eval_source is None:
                sample_feeds = source.batches(batch, 0, HOLDOUT)
            layers = units(graph, plan)
            errors = layer_sensitivity(calibrated, layers, sample_feeds, progress=progress)
            ranked = sorted(layers, key=lambda name: (errors[name][1].sqnr_db, errors[name][1].cosine))
            result.mixed = mixed.search(calibrated, ranked, metric, max_drop, progress=progress)
            keep_float = result.mixed.kept
        built = calibrated.build(keep_float=keep_float)
        quantized, plan, result.bias_corrections = built.model, built.plan, built.bias_corrections
        result.quantized_nodes, result.excluded_nodes = list(plan.quantized_nodes), plan.excluded_nodes
        if target == "ort":
            # Embedding tables feed no compute op, so the plan leaves them in float; stored as int8 they take
            # more than half off a transformer's file (all-MiniLM-L6-v2: 59 MB -> 23 MB).
            quantized, tables = quantize_dynamic(quantized, exclude=exclude, exclude_ops=exclude_ops, tables_only=True)
            result.quantized_nodes += tables.quantized_nodes
        act_ranges = calibrated.ranges(plan.calibrated)
        record = _record(plan, rewrite.activation_qparams(plan, act_ranges), act_ranges)
        if trt_cache is not None:
            # Implicit INT8 wants every tensor's symmetric amax; for --target trt the Q/DQ tensors keep theirs.
            cals = calibrated.calibrators
            planned = {t: cals[t] for t in plan.calibrated}
            symmetric = act_ranges if target == "trt" else calibrate.ranges(planned, symmetric=True)
            others = calibrate.ranges({t: c for t, c in cals.items() if t not in planned}, symmetric=True)
            amax = {t: r[1] for t, r in others.items()}
            amax.update({t: symmetric[root][1] for t, root in plan.activations.items()})
            write_trt_cache(trt_cache, amax)
            result.trt_cache = trt_cache

    if fp16_rest:
        quantized, result.fp16_nodes = fp16.convert(quantized)
    _copy_metadata(original, quantized)
    try:
        onnx.checker.check_model(quantized, full_check=False)
    except onnx.checker.ValidationError as exc:  # a bug in lowbit, not in the user's input
        raise LowbitError(f"internal error: the quantized model does not pass onnx.checker: {exc}") from exc
    quant_sess = session(quantized)
    save_model(quantized, output)
    record.update(
        {
            "lowbit": lowbit.__version__,
            "model": str(model_path),
            "target": result.target,
            "method": method,
            "dynamic": dynamic,
            "quantized_nodes": result.quantized_nodes,
            "excluded_nodes": result.excluded_nodes,
        }
    )
    atomic_write_text(ranges_path, json.dumps(record, indent=1) + "\n")

    if compare_models:
        float_sess = session(float_model)
        result.sizes = {"fp32": file_size(model_path), "int8": file_size(output)}
        eval_feeds = (
            eval_source.batches(batch)
            if eval_source is not None
            else (source.batches(batch, *held) if source is not None else None)
        )
        if eval_feeds is not None:
            result.agreement = compare.agreement(float_sess, quant_sess, eval_feeds)
            sample = next(iter(eval_feeds), None) or next(iter(source.batches(batch, 0, batch)), None)
        else:
            sample = None
        if sample is not None:
            result.latency = compare.latencies({"fp32": float_sess, "int8": quant_sess}, sample, inputs)
    return result


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
