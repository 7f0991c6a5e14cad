"""Ternary weights (``QuantizerConfig(bits=2, format="ternary")``, TWN, Li et al. 2016) in PyTorch: the formulas
of :mod:`lowbit.core.formats.ternary` (threshold ``0.7 * mean|w|``, fixed; scale ``mean(|w| over |w| > delta)``),
recomputed from the weight at every forward.

Backward: the straight-through estimator with clipping, ``dL/dw = dL/dw_q`` where ``|w| <= CLIP`` (1, as for
binary weights); threshold and scale are statistics of the weight, held constant by the gradient. Exported as
DequantizeLinear of int8 codes {-1, 0, +1} at the per-channel scale.
"""

from __future__ import annotations

import torch

from lowbit.core import QuantSpec
from lowbit.core.formats.ternary import THRESHOLD
from lowbit.torch.formats.binary import CLIP
from lowbit.torch.formats.common import dequantize_codes, slice_reduce, ste, view
from lowbit.torch.formats.registry import TorchFormat, register


def ternary_codes(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``sign(x) * [|x| > 0.7 * mean|x|]`` per slice, in x's dtype."""
    a = x.detach().abs()
    delta = THRESHOLD * slice_reduce(a, spec, lambda f: f.mean(1))
    return torch.sign(x.detach()) * (a > view(delta, x.shape, spec)).to(x.dtype)


@register
class TernaryFormat(TorchFormat):
    name = "ternary"

    def tensor_scale(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        kept = ternary_codes(x, spec).abs()
        total = slice_reduce(x.detach().abs() * kept, spec, lambda f: f.sum(1))
        count = slice_reduce(kept, spec, lambda f: f.sum(1))
        s = total / count.clamp_min(1)
        return torch.where(s > 0, s, torch.ones_like(s))

    def fake_quant(self, x, scale, zero_point, spec, grad_factor):
        return ste(x, ternary_codes(x, spec) * view(scale, x.shape, spec), CLIP)

    def export(self, x, scale, zero_point, spec):
        return dequantize_codes(ternary_codes(x, spec).cpu().numpy(), scale, spec)
