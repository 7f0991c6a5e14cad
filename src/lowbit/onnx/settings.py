"""The recipe as the ONNX front end runs it, and the options of a run.

:class:`Settings` is a :class:`lowbit.recipe.Config` resolved for its target and checked against what the ONNX
front end builds (8-bit activations on a grid the target runs, 8-bit weights per channel or per tensor, a
weight-rounding method of :mod:`lowbit.onnx.rounding`): everything the stages need, typed, decided once.
:class:`Options` says how a run goes (batch size, sample bound, image preprocessing, comparison, progress, a
TensorRT cache), :class:`Budget` asks for automatic mixed precision.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lowbit.core import QuantSpec, check_weight_method
from lowbit.errors import LowbitError, SpecError
from lowbit.onnx import rounding as weight_rounding
from lowbit.onnx.fp8 import is_fp8
from lowbit.onnx.matmulnbits import BITS, check_block_size
from lowbit.recipe import Config, LayerConfig, QuantizerConfig, Target, as_config, get_target, preset, resolve

DEFAULT_TARGET = "ort"  # the target of a recipe that names none
FP8_TARGET = "trt"  # ... and of an FP8 recipe: FP8 runs on TensorRT (ONNX Runtime's CPU only emulates it)
DEFAULT_ROUNDING = "gptq"
HOLDOUT = 64  # samples kept apart for the float vs quantized comparison when no evaluation data is given


FORMAT_PRESETS = ("int8", "fp8", "fp8_e4m3", "fp8_e5m2")  # --format: each the preset of that name


class QuantizeError(LowbitError, ValueError):
    """Options that do not fit together or a model that cannot be quantized as asked."""


WEIGHT_ONLY_ROUNDINGS = ("nearest", "gptq", "awq", "awq+gptq")  # awq: AWQ's scales, then nearest
WEIGHT_ONLY_METHODS = ("minmax", "mse")  # how a block's range is fitted (lowbit.core.weight_range)
WEIGHT_ONLY_BITS = {"int4": 4, "int8": 8}  # --weight-only
DEFAULT_GROUP = 128  # --weight-only without --group-size: blocks of 128 (int8 for a dequantize layout: per channel)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits' accuracy_level


@dataclass(frozen=True)
class WeightOnly:
    """Weight-only quantization (a recipe whose layers have a weight config and no input config): MatMul/Gemm
    weights stored as ``bits``-bit codes in blocks of ``group_size`` inputs (None: one scale per output channel),
    ``symmetric`` or with zero points, each block's range its own min/max or, with ``method="mse"``, the shrunk
    range of least squared error (:func:`lowbit.core.weight_range`), written as the target's ``layout``
    (:mod:`lowbit.onnx.matmulnbits`); ``rounding`` ``"nearest"`` or ``"gptq"`` (None: GPTQ when calibration
    data is given, else nearest), or ``"awq"`` / ``"awq+gptq"``: AWQ's per-input-channel scales first
    (:func:`lowbit.onnx.smoothing.awq`), then nearest or GPTQ codes; GPTQ's columns in ``act_order``.
    Activations stay float."""

    bits: int
    group_size: int | None
    symmetric: bool
    layout: str
    rounding: str | None
    act_order: bool
    method: str = "minmax"

    @property
    def awq(self) -> bool:
        """Whether AWQ scales the float model before its weights are rounded."""
        return self.rounding in ("awq", "awq+gptq")

    @property
    def needs_data(self) -> bool:
        """Whether the rounding reads calibration data (GPTQ's second moments, AWQ's activations)."""
        return self.rounding not in (None, "nearest")

    @classmethod
    def of(cls, config: Config, target: Target) -> WeightOnly:
        """The weight-only settings of ``config`` (resolved for ``target``), or a QuantizeError naming the option
        that does not fit."""
        w = config.default.weight
        if w.format != "int" or w.bits not in BITS:
            raise QuantizeError(f"weight-only quantization stores int4 or int8 weights (--weight-only int4|int8); "
                                f"the recipe's weights are {w.bits}-bit {w.format}")  # fmt: skip
        if w.granularity == "group":
            try:
                check_block_size(w.group_size)
            except ValueError as exc:
                raise QuantizeError(
                    f"--group-size {w.group_size}: {exc} (MatMulNBits' rule; 32, 64, 128 are usual)"
                ) from None
        elif w.granularity == "tensor" or target.weight_only == "matmulnbits":
            raise QuantizeError(f"--target {target.name} stores weight-only weights in blocks along the input axis: "
                                "give --group-size (128 is usual)")  # fmt: skip
        symmetric = bool(w.symmetric)
        if target.symmetric_weights and not symmetric:
            raise QuantizeError(f"--asymmetric: {target.runtime} takes symmetric weights only (zero point 0); drop "
                                "--asymmetric, or use --target ort or qdq")  # fmt: skip
        if w.method not in WEIGHT_ONLY_METHODS or w.scale != "float" or w.narrow_range:
            raise QuantizeError(f"weight-only quantization fits each block's range by "
                                f"{' or '.join(WEIGHT_ONLY_METHODS)} (--weight-method) on a float scale; got "
                                f"--weight-method {w.method}, --scale {w.scale}")  # fmt: skip
        if config.rounding is not None and config.rounding not in WEIGHT_ONLY_ROUNDINGS:
            raise QuantizeError(f"--rounding {config.rounding}: weight-only quantization rounds by "
                                f"{' or '.join(WEIGHT_ONLY_ROUNDINGS)}")  # fmt: skip
        if config.act_order and config.rounding in ("nearest", "awq"):
            raise QuantizeError("--act-order orders GPTQ's columns: drop it, or use --rounding gptq")
        unused = [flag for flag, on in (("--refine", config.refine), ("--smoothquant", config.smoothquant),
                  ("--fp16-rest", config.fp16_rest), ("residual_adds", config.residual_adds),
                  ("attention_matmuls", config.attention_matmuls), ("keep_ends_8bit", config.keep_ends_8bit),
                  ("--weight-only-rnn", config.weight_only_rnn), ("bias_correction", config.bias_correction))
                  if on]  # fmt: skip
        if unused:
            raise QuantizeError(f"{unused[0]} does not apply to weight-only quantization (activations stay float)")
        for pattern, other in config.overrides:
            if other is not None:
                raise QuantizeError(f"override {pattern!r}: weight-only quantization treats every layer alike; an "
                                    "override can only keep layers in float (None)")  # fmt: skip
        group = w.group_size if w.granularity == "group" else None
        return cls(w.bits, group, symmetric, target.weight_only, config.rounding, config.act_order, w.method)


@dataclass(frozen=True)
class Settings:
    """A recipe resolved for the ONNX front end (see the module doc)."""

    config: Config
    target: Target
    activation: QuantSpec  # how activations are stored (8-bit, per tensor)
    method: str | None  # None: dynamic
    method_options: dict[str, Any]
    per_channel: bool
    weight_method: str  # how each weight's range is fitted to its values (lowbit.core.weight_range)
    weight_options: dict[str, Any]
    rounding: str
    bias_correction: bool
    exclude: tuple[str, ...]  # regexes over node names, the recipe's and its float-override globs (translated)
    exclude_ops: tuple[str, ...]
    float_globs: tuple[str, ...]  # the globs of the overrides that keep layers in float
    weight_only: WeightOnly | None = None  # weight-only quantization: activations stay float

    @property
    def dynamic(self) -> bool:
        """Dynamic quantization: activation scales computed at run time (weight-only is not dynamic)."""
        return self.method is None and self.weight_only is None

    @property
    def format(self) -> str:
        """The number format of activations and weights alike (``"int"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``)."""
        return self.activation.format

    @classmethod
    def of(cls, config: str | Config) -> Settings:
        """The settings of ``config`` (a preset name or a Config), or a QuantizeError naming what the ONNX front
        end cannot build."""
        config = as_config(config)
        fp8 = is_fp8(_format_of(config.default))
        config = resolve(config, FP8_TARGET if fp8 else DEFAULT_TARGET)
        target = get_target(config.target)
        layer = config.default
        if layer is not None and layer.input is None and layer.weight is not None:
            return cls._weight_only(config, target)
        _check_layer(layer, target)
        globs = []
        for pattern, other in config.overrides:
            if other is not None and other != layer:
                raise QuantizeError(
                    f"override {pattern!r}: the ONNX front end quantizes every layer alike; an override can only "
                    "keep layers in float (None)"
                )
            if other is None:
                globs.append(pattern)
        if config.residual_adds:
            raise QuantizeError("residual_adds is for PyTorch models; for ONNX use target 'trt' (it quantizes skips)")
        if config.attention_matmuls:
            raise QuantizeError("attention_matmuls is for Hugging Face models in lowbit.torch; the ONNX front end "
                                "quantizes attention's MatMuls by its target's rules already (drop it)")  # fmt: skip
        if config.act_order:
            raise QuantizeError("act_order (--act-order) orders GPTQ's columns in weight-only quantization "
                                "(--weight-only) and lowbit.torch; the int8 path rounds in natural order")  # fmt: skip
        dynamic = layer.input.dynamic
        activation = QuantSpec(signed=True, symmetric=True) if dynamic else layer.input.spec(None)
        rounding = config.rounding or ("nearest" if fp8 else DEFAULT_ROUNDING)
        weight_rounding.get(rounding)
        if fp8:
            _check_fp8(config, rounding)
        if dynamic and config.smoothquant is not None:
            raise QuantizeError("smoothquant (--smoothquant) reads activation statistics from calibration data; "
                                "dynamic quantization has none (drop one of them)")  # fmt: skip
        if dynamic and config.rounding not in (None, "nearest"):
            raise QuantizeError(f"rounding {rounding!r} fits codes to calibration data; dynamic quantization has none")
        bias_correction = not dynamic and config.bias_correction is not False
        if config.refine is not None and layer.weight.scale == "pow2":
            raise QuantizeError(
                f"refine {config.refine!r} searches scales by factors that are not powers of two; it does not "
                "run with scale 'pow2'"
            )
        return cls(
            config=replace(config, rounding="nearest" if dynamic else rounding, bias_correction=bias_correction),
            target=target,
            activation=activation,
            method=None if dynamic else layer.input.method,
            method_options=dict(layer.input.method_options),
            per_channel=layer.weight.granularity == "channel",
            weight_method=layer.weight.method or "minmax",
            weight_options=dict(layer.weight.method_options),
            rounding="nearest" if dynamic else rounding,
            bias_correction=bias_correction,
            exclude=config.exclude + tuple(_glob_regex(g) for g in globs),
            exclude_ops=config.exclude_ops,
            float_globs=tuple(globs),
        )

    @classmethod
    def _weight_only(cls, config: Config, target: Target) -> Settings:
        wo = WeightOnly.of(config, target)
        globs = tuple(pattern for pattern, _ in config.overrides)
        return cls(
            config=replace(config, bias_correction=False),
            target=target,
            activation=QuantSpec(),  # unused: activations stay float
            method=None,
            method_options={},
            per_channel=wo.group_size is None,
            weight_method="minmax",
            weight_options={},
            rounding=wo.rounding or "nearest",
            bias_correction=False,
            exclude=config.exclude + tuple(_glob_regex(g) for g in globs),
            exclude_ops=config.exclude_ops,
            float_globs=globs,
            weight_only=wo,
        )


def _glob_regex(glob: str) -> str:
    return "^" + fnmatch.translate(glob)


def _format_of(layer) -> str:
    """The format of a layer config's quantizers (``"int"`` when it has none)."""
    given = [q.format for q in (layer.input, layer.weight) if q is not None] if layer is not None else []
    return next((f for f in given if f != "int"), "int")


def _check_fp8(config: Config, rounding: str) -> None:
    """Refuse what an FP8 build (:mod:`lowbit.onnx.fp8`) does not do, each in one line that names the option."""
    fmt = config.default.input.format
    if rounding != "nearest":
        raise QuantizeError(
            f"rounding {rounding!r} (--rounding) chooses integer weight codes; --format {fmt} rounds weights to "
            "the nearest FP8 value (drop --rounding)"
        )
    if config.refine is not None:
        raise QuantizeError(
            f"refine {config.refine!r} (--refine) searches integer-grid scales; it does not run with --format {fmt}"
        )


def _check_layer(layer, target: Target) -> None:
    if layer is None or layer.input is None or layer.weight is None:
        raise QuantizeError(
            "the ONNX front end quantizes activations and weights together, or weights only (an input config of "
            "None); the default layer config needs a weight config"
        )
    w = layer.weight
    if "stochastic" in (w.rounding, layer.input.rounding):
        raise QuantizeError(
            "QuantizerConfig(rounding='stochastic') is stochastic rounding in QAT's training steps (lowbit.torch); "
            "the ONNX front end draws weight codes so with --rounding stochastic (Config.rounding)"
        )
    if layer.input.format != w.format:
        raise QuantizeError(
            f"the ONNX front end takes one number format for the whole model; the recipe's weights are "
            f"{w.format!r} and its activations {layer.input.format!r} (--format sets both)"
        )
    if w.format != "int" and not is_fp8(w.format):
        raise QuantizeError(f"format {w.format!r}: the ONNX front end builds int8 and FP8 (fp8_e4m3, fp8_e5m2) only")
    if is_fp8(w.format):
        if layer.input.dynamic:
            raise QuantizeError(f"format {w.format!r} needs static quantization (drop --dynamic): ONNX Runtime's "
                                "dynamic quantization is integer")  # fmt: skip
        if not target.float8:
            raise QuantizeError(
                f"--format {w.format} --target {target.name}: that layout is made for {target.runtime}, which has "
                "no FP8 kernels; FP8 Q/DQ are laid out for TensorRT (--target trt, the default for FP8) or for a "
                "runtime that fuses Q/DQ itself (--target qdq)"
            )
    if w.bits != 8 or w.granularity == "group" or not w.symmetric or not w.signed:
        raise QuantizeError(
            f"the ONNX front end stores int8 symmetric weights per channel or per tensor; got {w.bits}-bit "
            f"{'symmetric' if w.symmetric else 'asymmetric'} weights per {w.granularity}"
        )
    if w.scale != layer.input.scale:
        raise QuantizeError(
            f"the ONNX front end takes one scale kind for the whole model; the recipe's weights have "
            f"{w.scale!r} scales and its activations {layer.input.scale!r} (--scale sets both)"
        )
    try:
        check_weight_method(w.method or "minmax", w.method_options)
    except SpecError as exc:
        raise QuantizeError(f"the weight config: {exc}") from None
    if layer.input.dynamic:
        if w.scale == "pow2":
            raise QuantizeError(
                "scale 'pow2' needs static quantization: ONNX Runtime computes dynamic activation scales at run time"
            )
        if w.method not in (None, "minmax"):
            raise QuantizeError(f"weight method {w.method!r}: dynamic quantization takes each weight's own max|w|")
        return
    try:
        target.check_activation(layer.input.spec(None))
    except LowbitError as exc:
        raise QuantizeError(f"{exc} (the recipe asks for {layer.input.bits}-bit "
                            f"{'int' if layer.input.signed else 'uint'} activations)") from None  # fmt: skip


@dataclass(frozen=True)
class Options:
    """How a run goes: ``batch_size`` samples per ONNX Runtime run, at most ``max_samples`` calibration samples,
    ``image_options`` for image folders (:class:`lowbit.data.ImageOptions`), ``compare`` (FP32 vs quantized
    latency and agreement), ``progress`` bars, and ``trt_cache``: also write TensorRT's calibration cache there.
    ``accuracy_level``: the compute type ONNX Runtime's MatMulNBits uses for a weight-only model's activations
    (0 unset: the kernel's default float; 1 fp32, 2 fp16, 3 bf16, 4 int8: activations quantized per block at run
    time); it chooses a kernel, not the stored weights."""

    batch_size: int = 8
    max_samples: int = 512
    image_options: Any = None
    compare: bool = True
    progress: bool = True
    trt_cache: Path | None = None
    accuracy_level: int = 0

    def __post_init__(self) -> None:
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise QuantizeError(f"--accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))} (MatMulNBits' "
                                f"compute type), got {self.accuracy_level!r}")  # fmt: skip
        for name in ("max_samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QuantizeError(f"{name} must be a positive integer, got {value!r}")
        if self.trt_cache is not None and not isinstance(self.trt_cache, Path):
            object.__setattr__(self, "trt_cache", Path(self.trt_cache))


@dataclass(frozen=True)
class Budget:
    """Automatic mixed precision: keep the fewest most sensitive layers in float until ``metric``
    (:class:`lowbit.onnx.metrics.Metric`) drops by at most ``max_drop`` from FP32."""

    metric: Any
    max_drop: float

    def __post_init__(self) -> None:
        if self.metric is None:
            raise QuantizeError("automatic mixed precision needs a metric")
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) or not self.max_drop >= 0:
            raise QuantizeError(f"max_drop must be 0 or more (the largest drop from FP32 allowed), got {self.max_drop}")


# The keyword arguments quantize() and analyze() took before recipes, and where each went.
_CONFIG_KEYWORDS = ("method", "method_options", "target", "per_channel", "exclude", "exclude_ops", "dynamic",
                    "weight_only_rnn", "bias_correction", "rounding", "fp16_rest")  # fmt: skip
_OPTION_KEYWORDS = {"batch_size": "batch_size", "max_samples": "max_samples", "image_options": "image_options",
                    "compare_models": "compare", "progress": "progress", "trt_cache": "trt_cache"}  # fmt: skip


def from_keywords(config: str | Config, options: Options, budget: Budget | None, keywords: dict[str, Any], call: str):
    """``(config, options, budget)`` with the keyword arguments of the call before recipes applied, and a
    DeprecationWarning that shows the new call. An unknown keyword is a TypeError, as Python's own."""
    unknown = [k for k in keywords if k not in (*_CONFIG_KEYWORDS, *_OPTION_KEYWORDS, "metric", "max_drop")]
    if unknown:
        raise TypeError(f"{call}() got an unexpected keyword argument {unknown[0]!r}")
    config = edit(as_config(config), **{k: v for k, v in keywords.items() if k in _CONFIG_KEYWORDS})
    moved = {_OPTION_KEYWORDS[k]: v for k, v in keywords.items() if k in _OPTION_KEYWORDS}
    options = replace(options, **moved)
    if "metric" in keywords or "max_drop" in keywords:
        if (keywords.get("metric") is None) != (keywords.get("max_drop") is None):
            raise QuantizeError("automatic mixed precision needs both a metric and max_drop")
        budget = Budget(keywords["metric"], keywords["max_drop"]) if keywords.get("metric") is not None else budget
    warnings.warn(
        f"{call}(..., {', '.join(f'{k}=' for k in keywords)}) is the call before recipes: write "
        f"{call}(model, ..., config, options=Options(...), budget=Budget(metric, max_drop)) with a "
        "lowbit.recipe.Config (see README, 'Python')",
        DeprecationWarning,
        stacklevel=3,
    )
    return config, options, budget


def edit(
    config: Config,
    *,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    target: str | None = None,
    per_channel: bool | None = None,
    exclude=None,
    exclude_ops=None,
    dynamic: bool = False,
    weight_only_rnn: bool | None = None,
    bias_correction: bool | None = None,
    rounding: str | None = None,
    fp16_rest: bool | None = None,
    refine: str | None = None,
    weight_method: str | None = None,
    scale: str | None = None,
    format: str | None = None,
    weight_only: str | None = None,
    group_size: int | None = None,
    asymmetric: bool | None = None,
    act_order: bool | None = None,
    smoothquant: float | str | None = None,
) -> Config:
    """``config`` with the flat options of the command line (and of the call before recipes) applied: each one
    given (not None) replaces what the recipe says. ``dynamic`` starts from the ``int8_dynamic`` preset's layer,
    ``format`` (a preset named after a format: ``int8``, ``fp8``, ``fp8_e4m3``, ``fp8_e5m2``) from that preset's
    layer and its weight rounding (FP8: nearest), the other options applied over it."""
    if format is not None:
        if format not in FORMAT_PRESETS:
            raise QuantizeError(f"unknown format {format!r} (--format); formats: {', '.join(FORMAT_PRESETS)}")
        if dynamic and format != "int8":
            raise QuantizeError(f"--format {format} needs static quantization: drop --dynamic")
        chosen = preset(format)
        config = replace(config, default=chosen.default, rounding=chosen.rounding)
    if dynamic:
        config = replace(config, default=preset("int8_dynamic").default)
    if method is not None or method_options is not None:
        current = config.default.input
        config = config.with_method(method or current.method, method_options)
    if per_channel is not None:
        config = config.with_weight_granularity("channel" if per_channel else "tensor")
    if weight_method is not None:
        config = config.with_weight_method(weight_method)
    if scale is not None:
        config = config.with_scale(scale)
    if weight_only is not None and (dynamic or format not in (None, "int8")):
        flag = "--dynamic" if dynamic else f"--format {format}"
        raise QuantizeError(f"--weight-only keeps activations float; {flag} quantizes them: drop one of the two")
    if weight_only is not None or group_size is not None or asymmetric is not None:
        config = _weight_only_config(config, weight_only, group_size, asymmetric, target)
    if act_order is not None:
        config = replace(config, act_order=act_order)
    plain = {"target": target, "exclude": exclude, "exclude_ops": exclude_ops, "weight_only_rnn": weight_only_rnn,
             "bias_correction": bias_correction, "rounding": rounding, "fp16_rest": fp16_rest,
             "refine": refine, "smoothquant": smoothquant}  # fmt: skip
    changes = {k: (tuple(v) if k.startswith("exclude") else v) for k, v in plain.items() if v is not None}
    return replace(config, **changes)


def _weight_only_config(config: Config, kind: str | None, group_size: int | None, asymmetric: bool | None,
                        target: str | None) -> Config:  # fmt: skip
    """``config`` with weight-only layers as ``--weight-only``, ``--group-size`` and ``--asymmetric`` say, over the
    recipe's own weight-only layer if it has one (``--config w4a16_group128``). Without a group size: the recipe's,
    else :data:`DEFAULT_GROUP`; int8 for a target that writes DequantizeLinear is per output channel, as TensorRT
    stores int8 weights."""
    layer = config.default
    base = layer.weight if layer is not None and layer.input is None else None
    if kind is None and base is None:
        raise QuantizeError("--group-size and --asymmetric describe weight-only quantization: add --weight-only "
                            "int4|int8 (or --config w4a16_group128)")  # fmt: skip
    if kind is not None and kind not in WEIGHT_ONLY_BITS:
        raise QuantizeError(f"--weight-only {kind}: choose one of {', '.join(WEIGHT_ONLY_BITS)}")
    bits = WEIGHT_ONLY_BITS[kind] if kind is not None else base.bits
    if group_size is None and base is not None and base.bits == bits:
        group_size = base.group_size
    elif group_size is None:
        layout = get_target(target or config.target or DEFAULT_TARGET).weight_only
        group_size = None if bits == 8 and layout == "dequantize" else DEFAULT_GROUP
    symmetric = not asymmetric if asymmetric is not None else (base.symmetric if base is not None else True)
    granularity = "channel" if group_size is None else "group"
    method = (base or (layer.weight if layer is not None and layer.weight is not None else None) or
              QuantizerConfig()).method  # fmt: skip
    weight = QuantizerConfig(bits=bits, symmetric=symmetric, signed=symmetric, granularity=granularity,
                             group_size=group_size, method=method)  # fmt: skip
    kept_float = tuple((pattern, other) for pattern, other in config.overrides if other is None)
    return replace(config, default=LayerConfig(None, weight), overrides=kept_float)  # float overrides stay
