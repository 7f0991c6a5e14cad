"""Typed quantization configs for PyTorch models, and the presets that name the common ones.

A :class:`Config` says, for every quantizable layer, how its input activation and its weight are quantized
(:class:`QuantizerConfig`, or None to keep that tensor in float). ``overrides`` map glob patterns over module
names (``fnmatch``: ``"features.0"``, ``"*.fc"``, ``"encoder.*"``) to another :class:`LayerConfig`, or to None to
leave the matching layers in float; later patterns win over earlier ones.

>>> cfg = preset("int8").override("classifier", None)   # everything INT8 but the classifier
>>> cfg.for_layer("classifier") is None, cfg.for_layer("conv1").weight.bits
(True, 8)
>>> preset("w4a16_group128").default.weight.group_size
128
>>> preset("w4a4").with_learned_scales().default.input.learn_scale   # for QAT (LSQ)
True
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any

from lowbit.calib import available as calibration_methods
from lowbit.core import QuantSpec
from lowbit.errors import SpecError

GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class QuantizerConfig:
    """How one tensor is quantized.

    bits: 2..16 (codes in ``[-2^(b-1), 2^(b-1) - 1]``, or ``[0, 2^b - 1]`` when ``signed`` is False).
    symmetric: zero point 0 (signed) and the range ``[-amax, amax]``; else an asymmetric range containing 0.
    granularity: ``"tensor"``, ``"channel"`` (weights: per output channel) or ``"group"`` (weights: blocks of
        ``group_size`` along the input axis).
    method: the calibrator of activation ranges (``lowbit.calib`` names: minmax, ema, percentile, entropy,
        mse); weights take their own max|w| per channel or group, or with ``mse`` the clipped range with the
        least squared error per channel or group.
    method_options: options of that calibrator (``{"percentile": 99.99}``).
    dynamic: the scale is computed from each batch at run time (activations of dynamic quantization).
    learn_scale: the scale is a trainable parameter (LSQ, Esser et al. 2020) during QAT.
    narrow_range: drop the lowest code (int8: [-127, 127]).
    """

    bits: int = 8
    symmetric: bool = True
    signed: bool = True
    granularity: str = "tensor"
    group_size: int | None = None
    method: str = "minmax"
    method_options: dict[str, Any] = field(default_factory=dict)
    dynamic: bool = False
    learn_scale: bool = False
    narrow_range: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise SpecError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise SpecError("granularity='group' needs a group_size, and a group_size needs granularity='group'")
        if self.method not in calibration_methods():
            raise SpecError(f"unknown calibration method {self.method!r}; methods: {', '.join(calibration_methods())}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise SpecError(f"bits must be an integer from 2 to 16, got {self.bits!r}")
        self.spec(1)  # validates the rest

    def spec(self, axis: int | None) -> QuantSpec:
        """The :class:`~lowbit.core.QuantSpec` of this config for a tensor whose channel axis is ``axis``."""
        return QuantSpec(
            bits=self.bits,
            signed=self.signed,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
            axis=None if self.granularity == "tensor" else axis,
            group_size=self.group_size if self.granularity == "group" else None,
        )


@dataclass(frozen=True)
class LayerConfig:
    """How one layer is quantized: its input activation and its weight (None: that tensor stays float)."""

    input: QuantizerConfig | None = QuantizerConfig()
    weight: QuantizerConfig | None = QuantizerConfig(granularity="channel")


@dataclass(frozen=True)
class Config:
    """The whole model's quantization: ``default`` for every layer, ``overrides`` by module-name pattern
    (later patterns win; a None value keeps the matching layers in float).

    ``residual_adds``: find the ``x + y`` additions of the model's ``forward`` with torch.fx and quantize their skip
    input with the layer input's config (TensorRT's rule: the add then runs inside the INT8 convolution before it);
    the quantized model is then a ``torch.fx.GraphModule``, and its adds are ``lowbit.torch.Add`` layers named
    after the module that wrote them (``layer1.0.add``), which overrides can match. :class:`Add` layers written in
    the model itself are quantized either way.
    """

    default: LayerConfig = LayerConfig()
    overrides: tuple[tuple[str, LayerConfig | None], ...] = ()
    residual_adds: bool = False

    def override(self, pattern: str, layer: LayerConfig | None) -> Config:
        """A copy with one more override (it wins over the earlier ones)."""
        return replace(self, overrides=(*self.overrides, (pattern, layer)))

    def with_residual_adds(self, on: bool = True) -> Config:
        """A copy that quantizes (or not) the skip input of the model's residual additions."""
        return replace(self, residual_adds=on)

    def with_learned_scales(self, on: bool = True) -> Config:
        """A copy whose every static quantizer learns its scale (LSQ) in QAT, overrides included."""

        def learned(layer: LayerConfig | None) -> LayerConfig | None:
            if layer is None:
                return None
            parts = [q if q is None or q.dynamic else replace(q, learn_scale=on) for q in (layer.input, layer.weight)]
            return LayerConfig(*parts)

        return replace(
            self, default=learned(self.default), overrides=tuple((p, learned(lc)) for p, lc in self.overrides)
        )

    def for_layer(self, name: str) -> LayerConfig | None:
        """The config of the module called ``name`` (None: leave it in float)."""
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


_INT8_WEIGHT = QuantizerConfig(granularity="channel")
_INT8_ACT = QuantizerConfig(method="mse")

PRESETS: dict[str, Config] = {
    # TensorRT's explicit INT8: symmetric int8, weights per output channel, activations per tensor.
    "int8": Config(LayerConfig(_INT8_ACT, _INT8_WEIGHT)),
    # Weights offline, activation scales per batch at run time (Linear/LSTM of large models).
    "int8_dynamic": Config(LayerConfig(QuantizerConfig(dynamic=True), _INT8_WEIGHT)),
    # uint8 asymmetric activations, as ONNX Runtime's CPU kernels run them fastest.
    "w8a8_asym": Config(LayerConfig(QuantizerConfig(signed=False, symmetric=False, method="mse"), _INT8_WEIGHT)),
    "w4a8": Config(LayerConfig(_INT8_ACT, QuantizerConfig(bits=4, granularity="channel"))),
    # Weight-only 4-bit in groups of 128 input features (the LLM recipe): activations stay float.
    "w4a16_group128": Config(LayerConfig(None, QuantizerConfig(bits=4, granularity="group", group_size=128))),
    # 4-bit activations asymmetric: after a ReLU a signed grid would waste half of its 16 levels.
    "w4a4": Config(
        LayerConfig(
            QuantizerConfig(bits=4, signed=False, symmetric=False, method="mse"),
            QuantizerConfig(bits=4, granularity="channel"),
        )
    ),
}


def preset(name: str) -> Config:
    """The preset called ``name``."""
    if name not in PRESETS:
        raise SpecError(f"unknown quantization preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve(config: str | Config) -> Config:
    """A :class:`Config` from a preset name or a config."""
    if isinstance(config, str):
        return preset(config)
    if not isinstance(config, Config):
        raise SpecError(f"config must be a preset name ({', '.join(PRESETS)}) or a lowbit.torch.Config, got {config!r}")
    return config
