"""Recipes by name. Each means the same in both front ends; activations marked "the target's" are stored as the
target does (ONNX Runtime: uint8 asymmetric; TensorRT and plain Q/DQ: int8 symmetric)."""

from __future__ import annotations

from dataclasses import replace

from lowbit.errors import SpecError
from lowbit.recipe.config import Config, LayerConfig, QuantizerConfig

_INT8_WEIGHT = QuantizerConfig(granularity="channel")
_TARGET_ACT = QuantizerConfig(signed=None, symmetric=None, method=None)  # the target's grid and method
_INT8 = Config(LayerConfig(_TARGET_ACT, _INT8_WEIGHT))

PRESETS: dict[str, Config] = {
    # INT8 static: int8 per-channel weights, activations on the target's grid with its default method (MSE).
    "int8": _INT8,
    "int8_trt": replace(_INT8, target="trt"),
    "int8_ort": replace(_INT8, target="ort"),
    "int8_qdq": replace(_INT8, target="qdq"),
    # Weights offline, activation scales per batch at run time (Linear/LSTM of large models).
    "int8_dynamic": Config(LayerConfig(QuantizerConfig(dynamic=True), _INT8_WEIGHT)),
    # uint8 asymmetric activations, as ONNX Runtime's CPU kernels run them fastest.
    "w8a8_asym": Config(LayerConfig(QuantizerConfig(signed=False, symmetric=False, method="mse"), _INT8_WEIGHT)),
    "w4a8": Config(LayerConfig(_TARGET_ACT, QuantizerConfig(bits=4, granularity="channel"))),
    # Weight-only 4-bit in groups of 128 input features (the LLM recipe): activations stay float.
    "w4a16_group128": Config(LayerConfig(None, QuantizerConfig(bits=4, granularity="group", group_size=128))),
    # 4-bit activations asymmetric: after a ReLU a signed grid would waste half of its 16 levels.
    "w4a4": Config(
        LayerConfig(
            QuantizerConfig(bits=4, signed=False, symmetric=False, method="mse"),
            QuantizerConfig(bits=4, granularity="channel"),
        )
    ),
    # Binary, 2-bit and ternary weights, int8 activations; the first and last weighted layers keep int8 weights
    # (Config.keep_ends_8bit), as the literature does. Meant for QAT (lowbit.torch.quantize(..., qat=True)).
    "w1a8": Config(LayerConfig(_TARGET_ACT, QuantizerConfig(bits=1, granularity="channel")), keep_ends_8bit=True),
    "w2a8": Config(
        LayerConfig(_TARGET_ACT, QuantizerConfig(bits=2, granularity="channel", method="mse")), keep_ends_8bit=True
    ),
    "ternary_a8": Config(
        LayerConfig(_TARGET_ACT, QuantizerConfig(bits=2, format="ternary", granularity="channel")),
        keep_ends_8bit=True,
    ),
    # 4-bit logarithmic weights (signed powers of two times a per-channel scale), int8 activations.
    "w4a8_log2": Config(LayerConfig(_TARGET_ACT, QuantizerConfig(bits=4, format="log2", granularity="channel"))),
}
PRESETS["dynamic"] = PRESETS["int8_dynamic"]
# Fixed point: every scale (activations, weights, biases) a power of two, for DSPs and NPUs without multipliers.
PRESETS["int8_pow2"] = _INT8.with_scale("pow2")


def _fp8(name: str) -> Config:
    """FP8 (Hopper/Blackwell, TensorRT): weights per output channel, activations per tensor calibrated by max (as
    NVIDIA does; measured in benchmarks/fp8_bench.py), scale = amax / 448 (E4M3) or / 57344 (E5M2); weights round
    to nearest (GPTQ chooses integer codes)."""
    act = QuantizerConfig(format=name, method="minmax")
    return Config(LayerConfig(act, QuantizerConfig(format=name, granularity="channel")), rounding="nearest")


PRESETS["fp8_e4m3"] = _fp8("fp8_e4m3")
PRESETS["fp8_e5m2"] = _fp8("fp8_e5m2")
PRESETS["fp8"] = PRESETS["fp8_e4m3"]


def preset(name: str) -> Config:
    """The preset called ``name``."""
    if name not in PRESETS:
        raise SpecError(f"unknown quantization preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def as_config(config: str | Config) -> Config:
    """A :class:`Config` from a preset name or a config."""
    if isinstance(config, str):
        return preset(config)
    if not isinstance(config, Config):
        raise SpecError(
            f"config must be a preset name ({', '.join(PRESETS)}) or a lowbit.recipe.Config, got {config!r}"
        )
    return config
