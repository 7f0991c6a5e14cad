"""The recipe both front ends take: what to quantize and how, as one frozen, validated value.

    from lowbit.recipe import Config, preset, load
    config = preset("int8_trt").with_method("percentile", {"percentile": 99.99}).override("*head*", None)
    lowbit.onnx.quantize("model.onnx", "model_int8.onnx", "calib.npz", config)
    lt.quantize(torch_model, config, calib)                     # the same recipe for a PyTorch model

Presets by name (:data:`PRESETS`), glob overrides per layer, targets by name (:func:`available_targets`), and
:func:`to_dict` / :func:`from_dict` / :func:`load` / :func:`save` for JSON and YAML files, recorded beside every
model lowbit writes. NumPy only.
"""

from lowbit.recipe import targets as _builtin_targets  # noqa: F401 (registers ort, trt, qdq)
from lowbit.recipe.config import GRANULARITIES, REFINEMENTS, Config, LayerConfig, QuantizerConfig, resolve
from lowbit.recipe.files import FORMAT_VERSION, from_dict, load, save, to_dict
from lowbit.recipe.presets import PRESETS, as_config, preset
from lowbit.recipe.target import Target, available_targets, get_target, register_target

__all__ = [
    "FORMAT_VERSION",
    "GRANULARITIES",
    "PRESETS",
    "REFINEMENTS",
    "Config",
    "LayerConfig",
    "QuantizerConfig",
    "Target",
    "as_config",
    "available_targets",
    "from_dict",
    "get_target",
    "load",
    "preset",
    "register_target",
    "resolve",
    "save",
    "to_dict",
]
