"""How the PyTorch front end reads a recipe (:mod:`lowbit.recipe`): a preset name or a Config, resolved for its
target (TensorRT's int8 symmetric activations when it names none, as :func:`lowbit.torch.export_onnx` writes
them), with the fields only the ONNX front end has refused by name.

>>> resolve("int8").default.input.symmetric, resolve("int8_ort").default.input.signed
(True, False)
"""

from __future__ import annotations

from lowbit.errors import SpecError
from lowbit.recipe import Config, QuantizerConfig, as_config, get_target
from lowbit.recipe import resolve as resolve_for

DEFAULT_TARGET = "trt"
RECIPE_ATTRIBUTE = "lowbit_recipe"  # the resolved recipe as data on a quantized model, which export_onnx records
ONNX_ONLY = {  # recipe field -> what to do instead in PyTorch
    "exclude": "keep layers in float with config.override(pattern, None) (globs over module names)",
    "exclude_ops": "keep layers in float with config.override(pattern, None) (globs over module names)",
    "bias_correction": "it is a step of the ONNX front end (lowbit.onnx.quantize)",
    "fp16_rest": "convert the exported ONNX model, or use lowbit.onnx.quantize",
    "weight_only_rnn": "it is a step of the ONNX front end's dynamic quantization",
}


def resolve(config: str | Config) -> Config:
    """The :class:`~lowbit.recipe.Config` named or given, for its target (:data:`DEFAULT_TARGET` by default)."""
    config = as_config(config)
    for name, instead in ONNX_ONLY.items():
        if getattr(config, name) not in ((), None, False):
            raise SpecError(f"config.{name} is not used by lowbit.torch: {instead}")
    return resolve_for(config, DEFAULT_TARGET)


def on_default_grid(cfg: QuantizerConfig) -> QuantizerConfig:
    """``cfg`` with the default target's activation grid and method where it leaves them to the target (a layer built
    from an unresolved preset, ``QuantLinear.from_float(fc, lt.preset("int8").default)``)."""
    return cfg.on_target(get_target(DEFAULT_TARGET))
