"""Layer-wise sensitivity analysis and automatic mixed precision for quantized PyTorch models.

    import lowbit.torch as lt
    qmodel = lt.quantize(model, "w4a8", calib=batches)
    a = lt.analyze(qmodel, batches[:8], metric=accuracy_on_val, max_drop=1.0, report="report.html")
    print(a.table()); print(a.mixed.table())
    fixed = lt.apply_mixed(qmodel, a.mixed)          # the top layers kept in float

A layer is a module that owns :class:`TensorQuantizer` s (``QuantConv2d``, ``QuantLinear``, ``QuantAdd``, ...).
"Only this layer quantized" switches every other layer's quantizers off; FP32 is every quantizer off. Nothing is
recalibrated: the scales stay those PTQ (or QAT) chose. The result is a :class:`lowbit.analysis.Analysis`, the
same as the ONNX analysis gives, and :func:`lowbit.analysis.report.write_report` renders it.

``mode="bits"`` ranks and searches weight bit widths instead: the model is weight-only quantized at low bits
(``w4a16_group128``), and the most sensitive layers get 8-bit weights, fewest first, until the budget is met.
There the cost of a layer is its weights' bytes, not its count: ``minimize="size"`` takes the layers by the output
noise each one's narrow weights add (``10^(-SQNR/10)`` of the model output with only that layer narrow) per byte that
widening it costs, so a large classifier layer waits behind the small early layers that hurt as much. Every step
records the quantized layers' weight bytes (at their widths; float weights at 4 bytes).

The search leaves the weights' codes as they are, which is right for nearest rounding and GPTQ (whose codes do not
depend on the layers upstream) but not for AdaRound, whose codes absorb the upstream error: ``rounding="adaround"``
makes every model the search tries a copy, rounded again with its widths (see :func:`search`).
"""

from __future__ import annotations

import copy
import glob
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.analysis import (
    Analysis,
    Error,
    ErrorMeter,
    LayerReport,
    MixedResult,
    Step,
    cosine_rows,
    tensor_report,
    weight_report,
    write,
)
from lowbit.calib.histogram_methods import MSECalibrator
from lowbit.errors import CalibrationError, SpecError
from lowbit.recipe import Config
from lowbit.torch import rounding as weight_rounding
from lowbit.torch.config import resolve
from lowbit.torch.ends import int8_weight
from lowbit.torch.quantizer import TensorQuantizer, evaluating
from lowbit.torch.runner import run_batch
from lowbit.torch.switches import (
    int_spec,
    kept_float,
    only,
    own_quantizers,
    quantized_layers,
    quantized_weights,
    wider_weights,
)

MODES = ("float", "bits")
MINIMIZE = ("layers", "size")


def re_roundings() -> tuple[str, ...]:
    """What a search may round the weights again with, for each model it tries: every registered weight rounding
    that fits codes to data (:mod:`lowbit.torch.rounding`) without scaling the float weights (AWQ), sorted."""
    methods = [weight_rounding.get(name) for name in weight_rounding.available()]
    return tuple(m.name for m in methods if m.needs_data and not m.scales_weights)


def _check_rounding(rounding: str | None) -> None:
    if rounding is not None and rounding not in re_roundings():
        raise SpecError(f"rounding must be one of {', '.join(re_roundings())} or None, got {rounding!r}")


def _weights(layer: nn.Module) -> Iterator[tuple[TensorQuantizer, torch.Tensor]]:
    """A layer's weight quantizers, each with the weight it quantizes."""
    q = getattr(layer, "weight_quantizer", None)
    if isinstance(q, TensorQuantizer) and isinstance(getattr(layer, "weight", None), torch.Tensor):
        yield q, layer.weight
    qs = getattr(layer, "weight_quantizers", None)
    if isinstance(qs, nn.ModuleDict):
        for pname, q in qs.items():
            w = getattr(layer, pname, None)
            if isinstance(q, TensorQuantizer) and isinstance(w, torch.Tensor):
                yield q, w


def weight_bytes(model: nn.Module) -> float:
    """The bytes of the weights of the layers lowbit swapped in, as they run now: each at its quantizer's bits, or 4
    bytes a value where the quantizer is off (scales, zero points and biases not counted)."""
    return sum(
        w.numel() * (q.spec.bits if q.mode == "quantize" else 32) / 8
        for layer in model.modules()
        for q, w in _weights(layer)
    )


def by_noise_per_byte(reports: Sequence[LayerReport], layers: dict[str, nn.Module], bits: int = 8) -> list[str]:
    """The layers whose weights can be widened to ``bits``, the most output noise removed per byte added first:
    a layer's noise is ``10^(-SQNR/10)`` of the model output with only that layer narrow (its
    ``own_model`` error), its cost the bytes its weights gain."""
    scored = []
    for r in reports:
        extra = sum(
            w.numel() * (bits - q.spec.bits) / 8
            for q, w in _weights(layers[r.name])
            if q.mode == "quantize" and q.spec.bits < bits
        )
        if extra > 0:
            scored.append((10 ** (-r.own_model.sqnr_db / 10) / extra, r.name))
    return [name for _, name in sorted(scored, key=lambda t: -t[0])]


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise CalibrationError(f"the model returned {type(out).__name__}; the analysis compares its first tensor output")


class _Capture:
    """Forward hooks that keep the output tensor of some modules for one batch."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self.values[name] = output.detach()

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _run(model: nn.Module, batch: Any, index: int) -> np.ndarray:
    with torch.no_grad():
        return _first_tensor(run_batch(model, batch, index)).detach().float().cpu().numpy()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy()


def _enabled(model: nn.Module, name: str, layers: dict[str, nn.Module], mode: str):
    """The context in which only layer ``name`` is quantized (mode float), or only it has narrow weights
    (mode bits: every other layer's weights at 8 bits)."""
    if mode == "float":
        return only(model, [name], layers)
    return wider_weights(model, [n for n in layers if n != name], 8, layers)


def layer_sensitivity(
    model: nn.Module, batches: Sequence[Any], *, mode: str = "float", progress: bool = True
) -> dict[str, tuple[Error, Error]]:
    """For each quantized layer: (its output's error, the model output's error) with only that layer quantized
    (``mode="bits"``: only that layer at its narrow weight width, the others at 8 bits)."""
    layers = quantized_layers(model)
    result = {}
    for name in tqdm(list(layers), desc="layer sensitivity", unit="layer", disable=not progress):
        own, out = ErrorMeter(), ErrorMeter()
        capture = _Capture({name: layers[name]})
        try:
            for i, batch in enumerate(batches):
                with only(model, [], layers):
                    ref = _run(model, batch, i)
                ref_layer = capture.values.pop(name, None)
                with _enabled(model, name, layers, mode):
                    got = _run(model, batch, i)
                got_layer = capture.values.pop(name, None)
                out.update(ref, got)
                if ref_layer is not None and got_layer is not None and ref_layer.shape == got_layer.shape:
                    own.update(_np(ref_layer), _np(got_layer))
        finally:
            capture.close()
        result[name] = (own.result() if own.samples else out.result(), out.result())
    return result


def _metric(metric: Any, batches: Sequence[Any]) -> tuple[Callable[[nn.Module], float], str, str, list]:
    """(score function, name, unit, FP32 outputs): ``"cosine"``/``"agreement"`` against FP32 outputs on
    ``batches`` (the list fills on the first score, FP32's), or the user's ``metric(model) -> float``."""
    if callable(metric):
        return metric, getattr(metric, "__name__", "metric"), "", []
    if metric not in ("cosine", "agreement"):
        raise ValueError(f"metric must be 'cosine', 'agreement' or a function model -> score, got {metric!r}")
    cache: list[np.ndarray] = []

    def score(model: nn.Module) -> float:
        outs = [_run(model, b, i) for i, b in enumerate(batches)]
        if not cache:  # the first call is FP32's (search() scores the float model first)
            cache.extend(outs)
        if metric == "cosine":
            return float(np.concatenate([cosine_rows(a, b) for a, b in zip(cache, outs, strict=True)]).mean())
        ref = np.concatenate([o.argmax(axis=1) for o in cache])
        return float((np.concatenate([o.argmax(axis=1) for o in outs]) == ref).mean() * 100)

    return score, metric, "" if metric == "cosine" else " %", cache


def search(
    model: nn.Module,
    ranked: Sequence[str],
    metric: Any,
    max_drop: float,
    *,
    batches: Sequence[Any] = (),
    mode: str = "float",
    max_layers: int | None = None,
    progress: bool = True,
    order: str = "most sensitive first",
    rounding: str | None = None,
    calib: Iterable[Any] | None = None,
) -> MixedResult:
    """Keep the layers of ``ranked`` (most sensitive first) in float (``mode="bits"``: give them 8-bit weights)
    one more at a time until ``metric`` drops by at most ``max_drop`` from FP32. ``metric``: ``"cosine"`` or
    ``"agreement"`` against FP32 on ``batches``, or a function ``model -> score`` (higher is better). ``order``
    says how ``ranked`` was made, for the report. The model is left as it was.

    ``rounding="adaround"``: AdaRound's codes depend on the widths upstream, so each model tried is a copy of
    ``model`` with the first k layers kept in float (or widened) and every weight rounded again on ``calib``
    (batches). ``"gptq"`` does the same with GPTQ, whose codes come from the float model and do not depend on the
    widths: there only the widened layers' 8-bit codes change (GPTQ's instead of nearest). A rounding per model
    tried is slow, so k is found by doubling (0, 1, 2, 4, ...) and then bisection, which assumes the metric grows
    with k; the result's ``model`` is the final step's model, the one to deploy (its activation ranges those
    ``model`` was calibrated with)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    _check_rounding(rounding)
    if rounding is not None:
        calib = list(calib) if calib is not None else []
        if not calib:
            raise CalibrationError(f"a search with rounding={rounding!r} needs calibration batches (calib=)")
    score, name, unit, outputs = _metric(metric, batches)
    layers = quantized_layers(model)
    unknown = [n for n in ranked if n not in layers]
    if unknown:
        raise ValueError(f"not quantized layers of this model: {', '.join(unknown[:5])}")
    with only(model, [], layers):
        reference = score(model)
    samples = sum(len(o) for o in outputs) if metric == "agreement" else None
    result = MixedResult(name, unit, reference, float(max_drop), kind=mode, samples=samples, order=order)
    limit = len(ranked) if max_layers is None else min(max_layers, len(ranked))
    if rounding is not None:
        return _rounded_search(model, list(ranked[:limit]), score, result, rounding, calib, progress)
    bar = tqdm(total=limit + 1, desc="mixed precision", unit="model", disable=not progress)
    for k in range(limit + 1):
        ctx = kept_float(model, ranked[:k], layers) if mode == "float" else wider_weights(model, ranked[:k], 8, layers)
        with ctx:
            s = score(model)
            size = weight_bytes(model)
        result.steps.append(Step(k, ranked[k - 1] if k else None, s, reference - s, size or None))
        bar.set_postfix_str(_probe_note(k, s, result), refresh=False)
        bar.update(1)
        if reference - s <= max_drop:
            result.met = True
            break
    bar.close()
    return result


def _probe_note(k: int, score: float, result: MixedResult) -> str:
    return f"{k} layer(s): {score:.4g} (budget {result.reference - result.max_drop:.4g})"


def _rounded_search(
    model: nn.Module,
    ranked: list[str],
    score: Callable[[nn.Module], float],
    result: MixedResult,
    rounding: str,
    calib: list[Any],
    progress: bool,
) -> MixedResult:
    """:func:`search` with the weights rounded again for each k tried (doubling, then bisection)."""
    result.names, result.rounding = ranked, rounding
    bar = tqdm(desc=f"mixed precision ({rounding} for each)", unit="model", disable=not progress)

    def met(k: int) -> bool:
        trial = copy.deepcopy(model)
        _widen_or_float(trial, ranked[:k], result.kind)
        _round(trial, rounding, calib)
        s = score(trial)
        result.steps.append(Step(k, ranked[k - 1] if k else None, s, result.reference - s, weight_bytes(trial) or None))
        bar.set_postfix_str(_probe_note(k, s, result), refresh=False)  # a long search shows what it found so far
        bar.update(1)
        ok = result.reference - s <= result.max_drop
        if ok:  # the bisection only ever meets the budget with fewer layers than before: keep the latest
            result.model = trial
        return ok

    failed, found = -1, None  # the most layers known to miss the budget, the fewest known to meet it
    k = 0
    while k <= len(ranked):
        if met(k):
            found = k
            break
        failed = k
        k = len(ranked) if k * 2 > len(ranked) and k < len(ranked) else max(1, k * 2)
    while found is not None and found - failed > 1:
        mid = (failed + found) // 2
        if met(mid):
            found = mid
        else:
            failed = mid
    bar.close()
    result.steps.sort(key=lambda s: s.kept)
    result.met = found is not None
    return result


def _round(model: nn.Module, rounding: str, calib: list[Any]) -> None:
    weight_rounding.get(rounding).apply(model, calib, progress=False)


def _widen_or_float(model: nn.Module, names: Iterable[str], kind: str) -> None:
    """Give the layers ``names`` of ``model`` 8-bit weights (``kind="bits"``) or switch their quantizers off."""
    layers = quantized_layers(model)
    for name in names:
        layer = layers[name]
        if kind == "bits":
            qs = quantized_weights(layer)
            for q in qs:
                q.spec = int_spec(q.spec)
            if qs:
                layer.calibrate_weight()
        else:
            for q in own_quantizers(layer):
                q.mode = "disabled"


def apply_mixed(model: nn.Module, result: MixedResult) -> nn.Module:
    """Make a search's outcome permanent on ``model``: its kept layers' quantizers switched off (or, for a
    bit-width search, their weights re-quantized at 8 bits). Returns ``model``. For a search that re-rounded its
    weights (``rounding=``), ``result.model`` is the final model itself, codes and all."""
    _widen_or_float(model, result.kept, result.kind)
    return model


def mixed_config(config: str | Config, result: MixedResult) -> Config:
    """The quantization config that gives a fresh :func:`lowbit.torch.quantize` a search's outcome: ``config`` (a
    preset name or a :class:`Config`, the one the searched model was quantized with) plus an override per kept
    layer, None for a layer kept in float, 8-bit weights for a widened one (its input's config unchanged). Use it
    to quantize again with another rounding (AdaRound's codes depend on every width upstream, so widths come
    first)::

        a = lt.analyze(q_gptq, batches, metric=..., max_drop=2.0, mode="bits", minimize="size")
        final = lt.quantize(model, lt.mixed_config("w4a8", a.mixed), calib=batches, rounding="adaround")
    """
    config = resolve(config)
    for name in result.kept:
        layer = config.for_layer(name)
        if result.kind == "float" or layer is None:
            config = config.override(glob.escape(name), None)
        elif layer.weight is not None:
            config = config.override(glob.escape(name), replace(layer, weight=int8_weight(layer.weight)))
    return config


def _histograms(model: nn.Module, batches: Sequence[Any], layers: dict[str, nn.Module]) -> dict[str, Any]:
    """An MSE (histogram) calibrator per static activation quantizer, fed with the float values it sees."""
    quantizers = {
        q.name or f"{lname}.{i}": q
        for lname, layer in layers.items()
        for i, q in enumerate(own_quantizers(layer))
        if not q.is_weight and not q.dynamic and q.mode == "quantize" and q.spec.axis is None
    }
    cals = {name: MSECalibrator(tensor=name) for name in quantizers}
    handles = []
    for name, q in quantizers.items():

        def pre(module, args, name=name):
            if args and isinstance(args[0], torch.Tensor):
                cals[name].update(_np(args[0].detach()))

        handles.append(q.register_forward_pre_hook(pre))
    try:
        with only(model, [], layers):
            for i, batch in enumerate(batches):
                _run(model, batch, i)
    finally:
        for h in handles:
            h.remove()
    return {name: (cals[name], quantizers[name]) for name in quantizers if cals[name].num_batches}


def analyze(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    metric: Any = None,
    max_drop: float | None = None,
    mode: str = "float",
    max_layers: int | None = None,
    minimize: str = "layers",
    rounding: str | None = None,
    report: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> Analysis:
    """Measure every quantized layer of ``model`` (quantized and calibrated by :func:`lowbit.torch.quantize`)
    against FP32 on ``batches`` (what the model's forward takes, as for calibration). With ``max_drop``, also
    search mixed precision (:func:`search`; ``metric`` defaults to ``"cosine"`` on ``batches``; at most
    ``max_layers`` layers kept in float or widened), taking the layers most sensitive first (``minimize="layers"``:
    the fewest layers) or, with ``mode="bits"``, the most output noise per byte first (``minimize="size"``: the
    smallest weights). ``rounding="adaround"``: every model the search tries has its weights rounded again by
    AdaRound on ``batches`` (learned codes depend on the widths upstream; see :func:`search`), and
    ``analysis.mixed.model`` is the one that met the budget. ``report`` writes the HTML report, ``json_path`` the
    numbers."""
    t0 = time.perf_counter()
    _check_analyze(mode, minimize, rounding)
    batches = list(batches)
    if not batches:
        raise CalibrationError("the analysis batches are empty: give at least one batch")
    layers = quantized_layers(model)
    if not layers:
        raise CalibrationError("the model has no quantized layer: quantize it first (lowbit.torch.quantize)")
    with evaluating(model):
        own = layer_sensitivity(model, batches, mode=mode, progress=progress)
        whole, accumulated, top1, n = _accumulated(model, batches, layers)
        reports = []
        for index, (name, layer) in enumerate(layers.items()):
            acc = accumulated[name].result() if accumulated[name].samples else own[name][1]
            inputs = [q.name for q in own_quantizers(layer) if not q.is_weight and q.name]
            reports.append(LayerReport(name, type(layer).__name__, f"{name}.output", acc, *own[name], inputs, index))
        reports.sort(key=lambda r: (r.own_model.sqnr_db, r.own_model.cosine))
        tensors = {
            name: tensor_report(name, cal, q.spec, q.method)
            for name, (cal, q) in _histograms(model, batches, layers).items()
        }
        methods = sorted({q.method for q in model.modules() if isinstance(q, TensorQuantizer) and not q.is_weight})
        kind = "torch" if mode == "float" else "torch, weight bits"
        analysis = Analysis(type(model).__name__, kind, ",".join(methods) or "-", n, 0.0, 0.0, "output",
                            whole.result(), top1, reports, tensors, _weight_reports(layers))  # fmt: skip
        if max_drop is not None:
            if minimize == "size":
                ranked, order = by_noise_per_byte(reports, layers), "most output noise removed per weight byte first"
            else:
                ranked, order = [r.name for r in reports], "most sensitive first"
            analysis.mixed = search(model, ranked, metric or "cosine", max_drop, batches=batches, mode=mode,
                                    max_layers=max_layers, progress=progress, order=order, rounding=rounding,
                                    calib=batches)  # fmt: skip
    analysis.seconds = time.perf_counter() - t0
    write(analysis, json_path, report)
    return analysis


def _check_analyze(mode: str, minimize: str, rounding: str | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if minimize not in MINIMIZE:
        raise ValueError(f"minimize must be one of {', '.join(MINIMIZE)}, got {minimize!r}")
    _check_rounding(rounding)
    if minimize == "size" and mode != "bits":
        raise ValueError(
            "minimize='size' is for the bit-width search (mode='bits'): a layer kept in float costs speed more than "
            "bytes; use minimize='layers' with mode='float'"
        )


def _accumulated(model: nn.Module, batches: Sequence[Any], layers: dict[str, nn.Module]):
    """The whole model's output error, each layer's output error in the fully quantized model (accumulated from
    every layer before it), the top-1 agreement (None unless the output looks like a classifier's) and the
    sample count, FP32 against the quantized model on ``batches``."""
    whole, accumulated = ErrorMeter(), {name: ErrorMeter() for name in layers}
    agree, n, classifier = 0, 0, True
    capture = _Capture(layers)
    try:
        for i, batch in enumerate(batches):
            with only(model, [], layers):
                ref = _run(model, batch, i)
            ref_layers = dict(capture.values)
            capture.values.clear()
            got = _run(model, batch, i)
            whole.update(ref, got)
            for name, value in capture.values.items():
                if name in ref_layers and ref_layers[name].shape == value.shape:
                    accumulated[name].update(_np(ref_layers[name]), _np(value))
            capture.values.clear()
            classifier = classifier and ref.ndim == 2 and ref.shape[1] > 1
            if classifier:
                agree += int((ref.argmax(1) == got.argmax(1)).sum())
            n += ref.shape[0]
    finally:
        capture.close()
    return whole, accumulated, (agree / n * 100 if classifier and n else None), n


def _weight_reports(layers: dict[str, nn.Module]) -> list:
    """Per-tensor vs per-channel SQNR of every quantized layer's weight, worst per tensor first."""
    weights = []
    for name, layer in layers.items():
        w = getattr(layer, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2:
            continue
        axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
        groups = getattr(layer, "groups", 1)
        depthwise = isinstance(layer, nn.Conv2d) and groups > 1 and groups == w.shape[0]
        q = getattr(layer, "weight_quantizer", None)
        fp8 = q is not None and q.spec.format != "int" and q.spec.bits == 8
        fmt = q.spec.format if fp8 else "int"  # FP8 weights on their own grid; the others as int8
        weights.append(weight_report(name, f"{name}.weight", _np(w.detach()), axis, depthwise, fmt))
    return sorted(weights, key=lambda r: r.per_tensor_sqnr_db)
