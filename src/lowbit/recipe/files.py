"""Recipes as data: :func:`to_dict` / :func:`from_dict` with a format version, and JSON or YAML files.

A file may start from a preset and change some fields; unknown keys are errors that list the known ones::

    lowbit_recipe: 1          # the format version (optional; a newer one than this lowbit reads is an error)
    preset: int8              # start from this preset (optional)
    target: trt
    default:
      input: {method: percentile, method_options: {percentile: 99.99}}
    overrides:
      - {pattern: "*classifier*", layer: null}   # keep in float
    exclude_ops: [Softmax]

>>> from lowbit.recipe import preset
>>> from_dict(to_dict(preset("int8_trt"))) == preset("int8_trt")
True
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from lowbit._io import atomic_write_text
from lowbit.errors import SpecError
from lowbit.recipe.config import Config, LayerConfig, QuantizerConfig
from lowbit.recipe.presets import preset

# 2: quantizers have format, scale and rounding; Config has keep_ends_8bit. 3: Config has act_order and smoothquant.
# 4: Config has attention_matmuls and blockwise.
FORMAT_VERSION = 4  # older versions still read
VERSION_KEY = "lowbit_recipe"
_LAYER_KEYS = ("input", "weight")


def _quantizer_dict(q: QuantizerConfig | None) -> dict[str, Any] | None:
    return None if q is None else {f.name: getattr(q, f.name) for f in fields(q)}


def _layer_dict(layer: LayerConfig | None) -> dict[str, Any] | None:
    return None if layer is None else {k: _quantizer_dict(getattr(layer, k)) for k in _LAYER_KEYS}


def to_dict(config: Config) -> dict[str, Any]:
    """``config`` as plain data (JSON/YAML types), with the format version."""
    out: dict[str, Any] = {VERSION_KEY: FORMAT_VERSION}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name == "default":
            value = _layer_dict(value)
        elif f.name == "overrides":
            value = [{"pattern": p, "layer": _layer_dict(layer)} for p, layer in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _check_keys(data: Any, known: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise SpecError(f"{where} must be a mapping, got {data!r}")
    unknown = [k for k in data if k not in known]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; keys: {', '.join(known)}")


def _quantizer(data: Any, base: QuantizerConfig | None, where: str) -> QuantizerConfig | None:
    if data is None:
        return None
    _check_keys(data, tuple(f.name for f in fields(QuantizerConfig)), where)
    try:
        return replace(base, **data) if base is not None else QuantizerConfig(**data)
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from None


def _layer(data: Any, base: LayerConfig | None, where: str) -> LayerConfig | None:
    if data is None:
        return None
    _check_keys(data, _LAYER_KEYS, where)
    base = base or LayerConfig()
    parts = {k: _quantizer(data[k], getattr(base, k), f"{where}.{k}") if k in data else getattr(base, k)
             for k in _LAYER_KEYS}  # fmt: skip
    return LayerConfig(**parts)


def _override(item: Any, index: int) -> tuple[str, LayerConfig | None]:
    where = f"overrides[{index}]"
    _check_keys(item, ("pattern", "layer"), where)
    if not isinstance(item.get("pattern"), str) or "layer" not in item:
        raise SpecError(f"{where} needs a pattern (a glob over layer names) and a layer (a layer config or null)")
    return item["pattern"], _layer(item["layer"], None, f"{where}.layer")


def from_dict(data: Any) -> Config:
    """The :class:`Config` that ``data`` (from :func:`to_dict`, a JSON or YAML file) describes; ``preset`` names
    the config the other keys change."""
    names = tuple(f.name for f in fields(Config))
    _check_keys(data, (VERSION_KEY, "preset", *names), "recipe")
    version = data.get(VERSION_KEY, FORMAT_VERSION)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise SpecError(
            f"recipe format {version!r} is not one this lowbit reads (1 to {FORMAT_VERSION}): upgrade lowbit"
        )
    base = preset(data["preset"]) if "preset" in data else Config()
    changes: dict[str, Any] = {}
    for name in names:
        if name not in data:
            continue
        value = data[name]
        if name == "default":
            value = _layer(value, base.default, "default")
        elif name == "overrides":
            if not isinstance(value, list):
                raise SpecError(f"overrides must be a list of {{pattern, layer}}, got {value!r}")
            value = tuple(_override(item, i) for i, item in enumerate(value))
        elif name in ("exclude", "exclude_ops") and isinstance(value, list):
            value = tuple(value)
        changes[name] = value
    return replace(base, **changes)


def _yaml():
    try:
        import yaml  # optional: JSON recipes need nothing
    except ImportError:
        raise SpecError("reading or writing a YAML recipe needs PyYAML: pip install pyyaml (or use .json)") from None
    return yaml


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def load(path: str | os.PathLike) -> Config:
    """The recipe in the JSON or YAML (``.yaml``/``.yml``) file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    try:  # a missing PyYAML says so, not "invalid YAML"
        parse = _yaml().safe_load if _is_yaml(path) else json.loads
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    try:
        data = parse(text)
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError's parse errors
        raise SpecError(f"{path}: not a valid {'YAML' if _is_yaml(path) else 'JSON'} recipe: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("yaml"):
            raise SpecError(f"{path}: not a valid YAML recipe: {exc}") from None
        raise
    try:
        return from_dict(data)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def save(config: Config, path: str | os.PathLike) -> Path:
    """Write ``config`` to ``path`` (JSON, or YAML for ``.yaml``/``.yml``), atomically."""
    path = Path(path)
    data = to_dict(config)
    text = _yaml().safe_dump(data, sort_keys=False) if _is_yaml(path) else json.dumps(data, indent=1) + "\n"
    atomic_write_text(path, text)
    return path
