"""Switching a quantized PyTorch model's quantizers per layer for a while: only some layers quantized, some kept
in float, some with wider weights; every mode, spec and code comes back after the block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import replace

from torch import nn

from lowbit.core import QuantSpec
from lowbit.torch.quantizer import TensorQuantizer


def own_quantizers(module: nn.Module) -> list[TensorQuantizer]:
    """The quantizers a layer owns: its direct :class:`TensorQuantizer` children and those in a child
    ``ModuleList``/``ModuleDict`` whose name ends in ``quantizers``."""
    out = []
    for name, child in module.named_children():
        if isinstance(child, TensorQuantizer):
            out.append(child)
        elif isinstance(child, (nn.ModuleList, nn.ModuleDict)) and name.endswith("quantizers"):
            out.extend(c for c in child.children() if isinstance(c, TensorQuantizer))
    return out


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module with an active quantizer, by name, in module order."""
    return {
        name: m
        for name, m in model.named_modules()
        if not isinstance(m, TensorQuantizer) and any(q.mode != "disabled" for q in own_quantizers(m))
    }


@contextlib.contextmanager
def only(model: nn.Module, enabled: Iterable[str] = (), layers: dict[str, nn.Module] | None = None) -> Iterator[None]:
    """Within the block, the quantizers of every layer not named in ``enabled`` are off (FP32 for those
    layers); their modes come back after."""
    layers = quantized_layers(model) if layers is None else layers
    keep = set(enabled)
    saved = [(q, q.mode) for q in model.modules() if isinstance(q, TensorQuantizer)]
    try:
        for name, layer in layers.items():
            if name not in keep:
                for q in own_quantizers(layer):
                    q.mode = "disabled"
        yield
    finally:
        for q, mode in saved:
            q.mode = mode


@contextlib.contextmanager
def kept_float(model: nn.Module, names: Iterable[str], layers: dict[str, nn.Module] | None = None) -> Iterator[None]:
    """Within the block, the layers named in ``names`` run in float."""
    layers = quantized_layers(model) if layers is None else layers
    with only(model, [n for n in layers if n not in set(names)], layers):
        yield


@contextlib.contextmanager
def wider_weights(model: nn.Module, names: Iterable[str], bits: int = 8, layers=None) -> Iterator[None]:
    """Within the block, the weights of the layers named in ``names`` are quantized to ``bits`` (their scales
    recomputed from the weights, rounded to nearest); the narrower specs, scales and codes come back after."""
    layers = quantized_layers(model) if layers is None else layers
    saved = []
    try:
        for name in names:
            layer = layers[name]
            qs = quantized_weights(layer)
            if not qs:
                continue
            for q in qs:
                saved.append((q, q.spec, q.scale.data, q.zero_point.data, q.codes.data))
                q.spec = int_spec(q.spec, bits)
            layer.calibrate_weight()
        yield
    finally:
        for q, spec, scale, zero_point, codes in saved:
            q.spec = spec
            q.set_qparams(scale.cpu().numpy(), zero_point.cpu().numpy())  # a learned exponent follows the scale
            q.codes = codes


def int_spec(spec: QuantSpec, bits: int = 8) -> QuantSpec:
    """``spec`` as uniform integers of ``bits`` rounded to nearest (a widened layer leaves FP8, log2, ternary or
    binary for int8; its scale kind and layout stay)."""
    return replace(spec, bits=bits, format="int", rounding="nearest")


def quantized_weights(layer: nn.Module) -> list[TensorQuantizer]:
    """The weight quantizers of ``layer`` that quantize now and that ``layer.calibrate_weight()`` recomputes (empty
    where the layer has none)."""
    if not hasattr(layer, "calibrate_weight"):
        return []
    return [q for q in own_quantizers(layer) if q.is_weight and q.mode == "quantize"]
