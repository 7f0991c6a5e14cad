"""Stochastic rounding of weights: each weight element takes ``floor(w / s + u)``, u ~ U[0, 1), at the scale
calibration chose, so that its expected code is exactly ``w / s`` (unbiased, where nearest rounding is biased per
element). The draw is seeded (:data:`SEED`, then one generator over the layers in model order), so a run repeats.
No data needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.core import quantize
from lowbit.torch.rounding.registry import register
from lowbit.torch.rounding.roundable import roundable_layers

SEED = 0


@register("stochastic", needs_data=False)
def stochastic(model: nn.Module, calib: Any = None, *, progress: bool = True, seed: int = SEED) -> list[str]:
    """Give the weights of ``model``'s roundable layers (:mod:`~lowbit.torch.rounding.roundable`) stochastically
    rounded codes (seeded by ``seed``); returns the names of the layers rounded."""
    rng = np.random.default_rng(seed)
    done = []
    for name, layer in roundable_layers(model).items():
        q = layer.weight_quantizer
        if q.spec.format != "int" or q.spec.bits == 1:
            continue
        w = layer.weight.detach().float().cpu().numpy()
        spec = q.spec.replace(rounding="stochastic")
        codes = quantize(w, q.scale.detach().cpu().numpy(), q.zero_point.cpu().numpy(), spec, rng=rng)
        q.set_codes(torch.as_tensor(codes.astype(np.int32)))
        done.append(name)
    return done
