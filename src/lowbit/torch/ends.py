"""``Config.keep_ends_8bit`` in PyTorch: the first and the last quantized layer with a weight keep int8 weights.

The binary, ternary and 2-bit literature (XNOR-Net, TWN, DoReFa, LSQ) keeps the first layer (few weights, raw
pixels in) and the last (the logits) at higher precision; a recipe says so with one flag, and this module turns it,
once the model's layers are known, into two overrides by exact layer name (``default`` input config kept).
"Order" is the order the model defines its modules in (``model.named_modules()``).
"""

from __future__ import annotations

import re
from dataclasses import replace

from torch import nn

from lowbit.recipe import Config, QuantizerConfig
from lowbit.torch.layers import MODULE_MAP, Add


def int8_weight(weight: QuantizerConfig) -> QuantizerConfig:
    """``weight`` as int8 per output channel (the int8 preset's weights), its scale kind and LSQ kept."""
    learn = weight.learn_scale and not weight.scales_itself
    return replace(weight, bits=8, format="int", granularity="channel", group_size=None, method="minmax",
                   method_options={}, rounding="nearest", learn_scale=learn)  # fmt: skip


def _exact(name: str) -> str:
    """A glob that matches ``name`` only."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def weighted_layers(model: nn.Module, config: Config) -> list[str]:
    """The names of the layers with a weight that ``config`` quantizes the weight of, in definition order."""
    out = []
    for name, m in model.named_modules():
        layer = config.for_layer(name) if name else None
        if type(m) in MODULE_MAP and not issubclass(type(m), Add) and layer is not None and layer.weight is not None:
            out.append(name)
    return out


def resolve_ends(model: nn.Module, config: Config) -> Config:
    """``config`` with its first and last weighted layers' weights at int8 when ``config.keep_ends_8bit``."""
    if not config.keep_ends_8bit:
        return config
    names = weighted_layers(model, config)
    for name in dict.fromkeys(names[:1] + names[-1:]):
        layer = config.for_layer(name)
        config = config.override(_exact(name), replace(layer, weight=int8_weight(layer.weight)))
    return config
