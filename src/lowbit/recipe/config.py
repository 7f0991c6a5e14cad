"""The recipe: what to quantize and how, as one frozen, validated value that both front ends take.

A :class:`Config` says, for every quantizable layer, how its input activation and its weight are quantized
(:class:`QuantizerConfig`, or None to keep that tensor in float), for which runtime (``target``), and which
refinements run (weight rounding, bias correction, FP16 for the rest). ``overrides`` map glob patterns over layer
names (``fnmatch``: ``"features.0"``, ``"*.fc"``, ``"encoder.*"``; PyTorch module names or ONNX node names) to
another :class:`LayerConfig`, or to None to leave the matching layers in float; later patterns win.

An activation config whose ``signed`` / ``symmetric`` are None stores activations as the target does (uint8
asymmetric for ONNX Runtime's CPU kernels, int8 symmetric for TensorRT), and one whose ``method`` is None
calibrates with the target's default method: :func:`resolve` fills them in.

>>> from lowbit.recipe import preset, resolve
>>> cfg = preset("int8").override("classifier", None)   # everything INT8 but the classifier
>>> cfg.for_layer("classifier") is None, cfg.for_layer("conv1").weight.bits
(True, 8)
>>> resolve(cfg, "ort").default.input.signed, resolve(cfg, "trt").default.input.signed
(False, True)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any

from lowbit.calib import available as calibration_methods
from lowbit.core import ROUNDINGS, SCALE_KINDS, QuantSpec
from lowbit.core import formats as number_formats
from lowbit.errors import SpecError
from lowbit.recipe.target import Target, get_target

GRANULARITIES = ("tensor", "channel", "group")
REFINEMENTS = ("easyquant",)  # the stages that may run after calibration (``Config.refine``)


@dataclass(frozen=True)
class QuantizerConfig:
    """How one tensor is quantized.

    bits: 1..16 (codes in ``[-2^(b-1), 2^(b-1) - 1]``, or ``[0, 2^b - 1]`` when ``signed`` is False; 1 is
        binarization, ``sign(w) * mean|w|``, for weights).
    symmetric: zero point 0 (signed) and the range ``[-amax, amax]``; else an asymmetric range containing 0.
        None (with ``signed`` None): as the target stores activations.
    granularity: ``"tensor"``, ``"channel"`` (weights: per output channel) or ``"group"`` (weights: blocks of
        ``group_size`` along the input axis).
    method: the calibrator of activation ranges (``lowbit.calib`` names: minmax, ema, percentile, entropy,
        mse, admm; None: the target's default method). Weights (:func:`lowbit.core.weight_range`) take their own
        max|w| per tensor, channel or group; with ``mse`` the clipped range with the least squared error per
        channel or group; with ``admm`` the scale fitted to its own codes per tensor, channel or group.
    method_options: options of that calibrator (``{"percentile": 99.99}``), or of the weights' method (admm:
        ``{"start": "percentile", "percentile": 99.9, "max_rounds": 50}``; the start is ``"max"`` by default).
    dynamic: the scale is computed from each batch at run time (activations of dynamic quantization).
    learn_scale: the scale is a trainable parameter (LSQ, Esser et al. 2020) during QAT.
    narrow_range: drop the lowest code (int8: [-127, 127]).
    format: the number format (:func:`lowbit.core.formats.available`): ``"int"`` (uniform integers) or another
        registered one, which decides what ``bits``, ``signed`` and ``symmetric`` may be.
    scale: ``"float"`` or ``"pow2"``: every scale a power of two (fixed point, as DSPs and many NPUs want).
    rounding: ``"nearest"`` or ``"stochastic"``: in training (QAT) the fake quantizer rounds ``floor(x / s + u)``,
        u ~ U[0, 1); evaluation and export always round to nearest. (Stochastic rounding of weights in PTQ is the
        weight-rounding method ``Config.rounding="stochastic"``.)
    """

    bits: int = 8
    symmetric: bool | None = True
    signed: bool | None = True
    granularity: str = "tensor"
    group_size: int | None = None
    method: str | None = "minmax"
    method_options: dict[str, Any] = field(default_factory=dict)
    dynamic: bool = False
    learn_scale: bool = False
    narrow_range: bool = False
    format: str = "int"
    scale: str = "float"
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise SpecError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise SpecError("granularity='group' needs a group_size, and a group_size needs granularity='group'")
        if self.method is not None and self.method not in calibration_methods():
            raise SpecError(f"unknown calibration method {self.method!r}; methods: {', '.join(calibration_methods())}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise SpecError(f"bits must be an integer from 1 to 16, got {self.bits!r}")
        if self.format not in number_formats.available():
            raise SpecError(f"unknown format {self.format!r}; formats: {', '.join(number_formats.available())}")
        if self.scale not in SCALE_KINDS:
            raise SpecError(f"scale must be one of {', '.join(SCALE_KINDS)}, got {self.scale!r}")
        if self.rounding not in ROUNDINGS:
            raise SpecError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if not isinstance(self.method_options, dict):
            raise SpecError(f"method_options must be a dict of calibrator options, got {self.method_options!r}")
        if self.learn_scale and self.scales_itself:
            raise SpecError("learn_scale: binary and ternary weights take their scale from the weight at every step")
        if (self.signed is None) != (self.symmetric is None):
            raise SpecError("signed and symmetric are None together (the target's activation grid) or both given")
        if not self.follows_target:
            self.spec(1)  # validates the rest

    @property
    def scales_itself(self) -> bool:
        """Binary (``bits=1``, mean|w|) and ternary weights: the scale is the weight's own at every step."""
        return number_formats.scales_itself(self)

    @property
    def weights_only(self) -> bool:
        """A format for constant weights only (binary, ternary, log2)."""
        return number_formats.weights_only(self)

    @property
    def follows_target(self) -> bool:
        """Whether signedness and symmetry are left to the target (see :func:`resolve`)."""
        return self.signed is None

    def on_target(self, target: Target) -> QuantizerConfig:
        """This config with the target's activation grid and default method filled in where left to the target."""
        out = self if self.method is not None else replace(self, method=target.default_method)
        if not out.follows_target:
            return out
        return replace(out, signed=target.activation.signed, symmetric=target.activation.symmetric)

    def spec(self, axis: int | None) -> QuantSpec:
        """The :class:`~lowbit.core.QuantSpec` of this config for a tensor whose channel axis is ``axis``."""
        if self.follows_target:
            raise SpecError("this activation config follows the target's grid: resolve the Config against a target")
        return QuantSpec(
            bits=self.bits,
            signed=self.signed,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
            axis=None if self.granularity == "tensor" else axis,
            group_size=self.group_size if self.granularity == "group" else None,
            rounding=self.rounding,
            scale_kind=self.scale,
            format=self.format,
        )


@dataclass(frozen=True)
class LayerConfig:
    """How one layer is quantized: its input activation and its weight (None: that tensor stays float)."""

    input: QuantizerConfig | None = QuantizerConfig()
    weight: QuantizerConfig | None = QuantizerConfig(granularity="channel")

    def __post_init__(self) -> None:
        if self.input is not None and self.input.weights_only:
            kind = "bits=1" if self.input.format == "int" else f"format={self.input.format!r}"
            raise SpecError(f"input QuantizerConfig({kind}) is for weights only: quantize activations with int8")

    def on_target(self, target: Target) -> LayerConfig:
        return LayerConfig(None if self.input is None else self.input.on_target(target), self.weight)


def _names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{what} must be a list of strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Config:
    """The whole model's quantization (see the module doc).

    target: the runtime the model is laid out for (:func:`lowbit.recipe.available_targets`: ``ort``, ``trt``, ``qdq``);
        None: the front end's default (``ort`` for ONNX models, ``trt`` for PyTorch's Q/DQ export).
    default / overrides: the layers' configs, by glob pattern over layer names (later patterns win; None keeps
        the matching layers in float).
    exclude / exclude_ops: regexes over ONNX node names and ONNX op types kept in float (a pattern or op type
        that matches nothing is an error).
    rounding: how weights get their integer codes: a weight-rounding method of the front end (``nearest``,
        ``gptq``; PyTorch also ``adaround``); None: the front end's default (ONNX: gptq; PyTorch: nearest).
    bias_correction: move each Conv/Gemm bias by the mean shift weight rounding causes (ONNX; None: on).
    refine: a stage after calibration that searches the scales again (:data:`REFINEMENTS`): ``"easyquant"``
        (Wu et al. 2020) searches, layer by layer with the quantized model upstream, each output channel's weight
        scale and the layer's input scale for the highest cosine of the layer's output to FP32. None: no stage.
    fp16_rest: run every node outside the quantizers in float16 (ONNX; INT8 + FP16 as TensorRT builds).
    weight_only_rnn: with dynamic activations, also store GRU/RNN weights as int8 (ONNX).
    residual_adds: find the ``x + y`` additions of a PyTorch model's ``forward`` with torch.fx and quantize their
        skip input with the layer input's config (TensorRT's rule); the quantized model is then a
        ``torch.fx.GraphModule`` whose adds are ``lowbit.torch.Add`` layers named after the module that wrote them
        (``layer1.0.add``), which overrides can match.
    keep_ends_8bit: the first and the last quantized layer with a weight (in the order the model defines its
        modules) keep int8 per-channel weights whatever ``default`` and ``overrides`` say (their inputs as
        configured), as the binary/ternary/2-bit literature does; the front end resolves it into two overrides
        once it knows the layers (PyTorch: :func:`lowbit.torch.ends.resolve_ends`).
    act_order: GPTQ rounds each layer's input columns in order of decreasing second moment (the inputs with the
        most energy first) instead of their natural order; the group scales stay those of plain rounding.
    smoothquant: SmoothQuant (Xiao et al. 2022) before static quantization: each MatMul/Gemm input is divided per
        channel by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and its weight rows multiplied by it (folded
        into the op that writes the input where it can be). A number is ``alpha`` in [0, 1] (0.5 is the
        paper's); ``"search"`` picks ``alpha`` per layer for the least output error; None: off.
    attention_matmuls: also quantize the inputs of the two matrix products of attention, ``Q K^T`` and
        ``softmax(.) V``, per tensor with the input config of the attention module's name (PyTorch, Hugging Face
        ``transformers`` models: :mod:`lowbit.torch.hf`).
    blockwise: GPTQ, AWQ and SmoothQuant (PyTorch) gather their statistics block by block where the model has
        repeated blocks (its longest ``nn.ModuleList`` of one class), feeding each block the previous one's
        output: peak memory one block's statistics and activations, not every layer's. False: one pass.
    """

    default: LayerConfig = LayerConfig()
    overrides: tuple[tuple[str, LayerConfig | None], ...] = ()
    residual_adds: bool = False
    target: str | None = None
    exclude: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    rounding: str | None = None
    bias_correction: bool | None = None
    refine: str | None = None
    fp16_rest: bool = False
    weight_only_rnn: bool = False
    keep_ends_8bit: bool = False
    act_order: bool = False
    smoothquant: float | str | None = None
    attention_matmuls: bool = False
    blockwise: bool = True

    def __post_init__(self) -> None:
        if self.target is not None:
            get_target(self.target)  # an unknown name lists the targets
        object.__setattr__(self, "exclude", _names(self.exclude, "exclude"))
        object.__setattr__(self, "exclude_ops", _names(self.exclude_ops, "exclude_ops"))
        object.__setattr__(self, "overrides", tuple((p, layer) for p, layer in self.overrides))
        if self.rounding is not None and not isinstance(self.rounding, str):
            raise SpecError(f"rounding must be the name of a weight-rounding method, got {self.rounding!r}")
        for name in ("residual_adds", "fp16_rest", "weight_only_rnn", "keep_ends_8bit", "act_order",
                     "attention_matmuls", "blockwise"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.bias_correction is not None and not isinstance(self.bias_correction, bool):
            raise SpecError(f"bias_correction must be true, false or None, got {self.bias_correction!r}")
        _check_smoothquant(self.smoothquant)
        if self.refine is not None and self.refine not in REFINEMENTS:
            raise SpecError(f"unknown refinement {self.refine!r}; refinements: {', '.join(REFINEMENTS)} (or None)")

    def override(self, pattern: str, layer: LayerConfig | None) -> Config:
        """A copy with one more override (it wins over the earlier ones)."""
        return replace(self, overrides=(*self.overrides, (pattern, layer)))

    def with_residual_adds(self, on: bool = True) -> Config:
        """A copy that quantizes (or not) the skip input of the model's residual additions."""
        return replace(self, residual_adds=on)

    def with_learned_scales(self, on: bool = True) -> Config:
        """A copy whose every static quantizer learns its scale (LSQ) in QAT, overrides included."""

        def learned(q: QuantizerConfig | None) -> QuantizerConfig | None:
            if q is None or q.dynamic or q.scales_itself:
                return q
            return replace(q, learn_scale=on)

        return self._map_layers(lambda layer: LayerConfig(learned(layer.input), learned(layer.weight)))

    def with_method(self, method: str, options: dict[str, Any] | None = None) -> Config:
        """A copy whose static activation quantizers calibrate with ``method`` (and ``options``)."""

        def calibrated(q: QuantizerConfig | None) -> QuantizerConfig | None:
            if q is None or q.dynamic:
                return q
            return replace(q, method=method, method_options=dict(q.method_options if options is None else options))

        return self._map_layers(lambda layer: LayerConfig(calibrated(layer.input), layer.weight))

    def with_weight_granularity(self, granularity: str) -> Config:
        """A copy whose weights are quantized per ``"channel"`` or per ``"tensor"``."""

        def grained(q: QuantizerConfig | None) -> QuantizerConfig | None:
            return q if q is None else replace(q, granularity=granularity, group_size=None)

        return self._map_layers(lambda layer: LayerConfig(layer.input, grained(layer.weight)))

    def with_scale(self, kind: str) -> Config:
        """A copy whose every quantizer (inputs and weights, overrides included) takes ``kind`` scales:
        ``"float"``, or ``"pow2"`` (fixed point)."""

        def scaled(q: QuantizerConfig | None) -> QuantizerConfig | None:
            return q if q is None else replace(q, scale=kind)

        return self._map_layers(lambda layer: LayerConfig(scaled(layer.input), scaled(layer.weight)))

    def with_weight_method(self, method: str, options: dict[str, Any] | None = None) -> Config:
        """A copy whose weights take their ranges by ``method`` with ``options`` (None: the current ones if the
        method stays, else none)."""

        def fitted(q: QuantizerConfig | None) -> QuantizerConfig | None:
            if q is None:
                return q
            kept = q.method_options if q.method == method else {}
            return replace(q, method=method, method_options=dict(kept if options is None else options))

        return self._map_layers(lambda layer: LayerConfig(layer.input, fitted(layer.weight)))

    def _map_layers(self, fn) -> Config:
        def apply(layer: LayerConfig | None) -> LayerConfig | None:
            return None if layer is None else fn(layer)

        return replace(self, default=apply(self.default), overrides=tuple((p, apply(lc)) for p, lc in self.overrides))

    def for_layer(self, name: str) -> LayerConfig | None:
        """The config of the layer called ``name`` (None: leave it in float)."""
        out: LayerConfig | None = self.default
        for pattern, layer in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                out = layer
        return out

    @property
    def dynamic(self) -> bool:
        """Whether no layer needs calibration data (every quantized input is dynamic or float)."""
        layers = [self.default, *(layer for _, layer in self.overrides)]
        return all(layer is None or layer.input is None or layer.input.dynamic for layer in layers)


def _check_smoothquant(value: Any) -> None:
    if value is None or value == "search":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise SpecError(f"smoothquant must be alpha, a number in [0, 1] (0.5 is usual), or 'search'; got {value!r}")


def resolve(config: Config, default_target: str) -> Config:
    """``config`` for its target (``default_target`` when it names none): the target set, and every activation
    config that leaves its grid or its method to the target given the target's (:attr:`Target.activation`,
    :attr:`Target.default_method`)."""
    target = get_target(config.target or default_target)
    return replace(config, target=target.name)._map_layers(lambda layer: layer.on_target(target))
