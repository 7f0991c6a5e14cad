"""Logarithmic weights (``QuantizerConfig(bits=4, format="log2")``) in PyTorch: the codes of
:mod:`lowbit.core.formats.log2` (``0`` and ``sign * scale * 2^(|c| - M)``, ``M = 2^(bits-1) - 1``), the scale
calibrated from max|w| per channel (or learned, LSQ), rounding to the nearest power in the linear domain.

Backward: straight-through, ``w_q = s * q(u)`` with ``u = w / s`` and ``dq/du = 1`` for ``|u| <= 1``, 0 beyond
(clipped weights stop learning); a learned ``s`` gets ``q(u) - u`` inside and ``sign(u)`` beyond, as LSQ.

Export: a lookup ONNX Runtime runs: the int8 codes (an initializer, 1 byte a weight) ->
``DequantizeLinear(codes, 1, -M)`` (the index ``c + M`` as a float) -> ``Cast`` to int64 -> ``Gather`` into the
table of the ``2M + 1`` signed powers -> ``Mul`` by the per-channel scale.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.core import QuantSpec
from lowbit.core.formats.log2 import DEFAULT_DOMAIN, DOMAINS, levels, table
from lowbit.torch.formats.common import constant, grad_scale, view
from lowbit.torch.formats.registry import TorchFormat, register


def log2_levels(u: torch.Tensor, bits: int, domain: str = DEFAULT_DOMAIN) -> torch.Tensor:
    """The signed power of two (or 0) nearest each ``u`` (``|u|`` clipped to 1), at scale 1."""
    m = levels(bits)
    r = u.abs().clamp(max=1.0)
    mant, exp = torch.frexp(r)
    e = exp.to(u.dtype) - 1 + (mant > DOMAINS[domain]).to(u.dtype)
    if domain == "linear":
        e = torch.where(r >= 2.0**-m, e.clamp_min(1 - m), e)
    keep = (r > 0) & (e >= 1 - m)
    return torch.where(keep, torch.sign(u) * torch.exp2(e.clamp_min(1 - m)), torch.zeros_like(u))


class Lookup(torch.autograd.Function):
    """``table[codes + M] * scale``, traced as DequantizeLinear -> Cast -> Gather -> Mul."""

    @staticmethod
    def forward(ctx, codes, lut, scale, m: int):
        return lut[codes.long() + m] * scale

    @staticmethod
    def symbolic(g, codes, lut, scale, m):
        one = g.op("Constant", value_t=torch.tensor(1.0))
        offset = g.op("Constant", value_t=torch.tensor(-m, dtype=torch.int8))
        index = g.op("Cast", g.op("DequantizeLinear", codes, one, offset), to_i=7)  # 7: INT64
        return g.op("Mul", g.op("Gather", lut, index, axis_i=0), scale)


@register
class Log2Format(TorchFormat):
    name = "log2"

    def fake_quant(self, x, scale, zero_point, spec, grad_factor):
        s = view(grad_scale(scale, grad_factor), x.shape, spec)
        u = x / s
        inside = u.clamp(-1.0, 1.0)
        q = inside + (log2_levels(u.detach(), spec.bits) - inside).detach()
        return q * s

    def codes(self, x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> np.ndarray:
        """The int8 codes ``-M..M`` of ``x``."""
        q = log2_levels(x.detach() / view(scale.detach(), x.shape, spec), spec.bits)
        mag = torch.where(q != 0, torch.log2(q.abs().clamp_min(1e-30)) + levels(spec.bits), torch.zeros_like(q))
        return (torch.sign(q) * torch.round(mag)).cpu().numpy().astype(np.int8)

    def export(self, x, scale, zero_point, spec):
        s = view(scale.detach().float(), x.shape, spec).cpu().numpy()
        m = levels(spec.bits)
        return Lookup.apply(constant(self.codes(x, scale, spec)), constant(table(spec.bits)), constant(s), m)
