"""The layers a weight rounding can give codes to, and their weights as matrices.

Roundable: ``Conv1d``/``Conv2d`` (zero padding, any groups) and ``Linear`` layers whose weight quantizer is static
and calibrated. A weight is rounded as (groups, rows, columns): a row per output channel, a column per input
feature (a convolution's (in-channel, taps), in the weight's order).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lowbit.core.formats import scales_itself
from lowbit.errors import CalibrationError
from lowbit.torch.layers import QuantMixin


def roundable(module: nn.Module) -> bool:
    """Whether a weight rounding can choose ``module``'s weight codes."""
    if not isinstance(module, QuantMixin) or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        return False
    if type(module)._weight_to_quantize is not QuantMixin._weight_to_quantize:  # e.g. a conv with its BN folded
        return False
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode != "zeros":
        return False
    q = module.weight_quantizer
    if q.spec.format != "int" or scales_itself(q.spec):  # FP8, log2; binary: no integer codes to choose
        return False
    return q.mode == "quantize" and q.calibrated and not q.dynamic


def roundable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` a weight rounding can round, by name."""
    return {name: m for name, m in model.named_modules() if roundable(m)}


def chosen_layers(model: nn.Module, names: Iterable[str] | None, method: str) -> dict[str, nn.Module]:
    """The roundable layers of ``model`` named in ``names`` (all of them when None), in that order; a name that is
    not one is an error that lists the roundable ones. ``method`` names the rounding in the message."""
    kind = "a calibrated, statically quantized Conv1d/Conv2d/Linear layer"
    return named_subset(roundable_layers(model), names, f"{method} cannot round", kind, "Roundable")


def named_subset(found: dict[str, nn.Module], names: Iterable[str] | None, cannot: str, kind: str, able: str):
    """``found`` restricted to ``names`` (all of it when None), in that order; a name not in it is a one-line
    CalibrationError: "<cannot> <names>: not <kind> of this model. <able> layers: ..."."""
    if names is None:
        return found
    wanted = list(names)
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise CalibrationError(
            f"{cannot} {', '.join(unknown[:5])}: not {kind} of this model. "
            f"{able} layers: {', '.join(list(found)[:8]) or 'none'}"
        )
    return {n: found[n] for n in wanted}


def groups(module: nn.Module) -> int:
    """A convolution's groups; 1 for a Linear."""
    return module.groups if isinstance(module, nn.Conv1d | nn.Conv2d) else 1


def weight_matrix(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor of the weight's shape as (groups, rows, columns): a row per output channel, a column per input
    feature (a conv's (in-channel, taps), in the weight's order)."""
    g = groups(module)
    return t.reshape(g, t.shape[0] // g, -1)
