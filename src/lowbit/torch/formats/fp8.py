"""FP8 E4M3FN and E5M2 in PyTorch: fake quantization with a straight-through gradient, and its ONNX form.

    y = fp8(clamp(x / s, -max, max)) * s        max = 448 (E4M3FN) or 57344 (E5M2)

``fp8`` is torch's cast to ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` and back (round to nearest even; it does
not saturate, hence the clamp first), bit for bit :mod:`lowbit.core.formats.fp8`. The gradient with respect to
``x`` is 1 inside ``[-max * s, max * s]`` and 0 outside; with respect to a learned scale it is LSQ's:
``fp8(x / s) - x / s`` inside and ``+-max`` outside (times ``grad_factor``).
Export writes ``QuantizeLinear`` / ``DequantizeLinear`` with a FLOAT8E4M3FN (FLOAT8E5M2) zero point, opset 19+.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.core import QuantSpec
from lowbit.core.formats import fp8 as core_fp8
from lowbit.torch.formats.common import grad_scale, view
from lowbit.torch.formats.registry import TorchFormat, register

DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def round_fp8(v: torch.Tensor, name: str) -> torch.Tensor:
    """``v`` rounded to the FP8 format ``name`` (saturating at +-max), in ``v``'s dtype, no gradient."""
    top = core_fp8.fp8_max(name)
    return torch.clamp(v, -top, top).to(DTYPES[name]).to(v.dtype)


class _FP8QDQ(torch.autograd.Function):
    """FP8 fake quantization that the TorchScript ONNX exporter writes as QuantizeLinear + DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, spec: QuantSpec):
        return round_fp8(x / view(scale, x.shape, spec), spec.format) * view(scale, x.shape, spec)

    @staticmethod
    def symbolic(g, x, scale, spec: QuantSpec):
        attrs: dict[str, Any] = {} if spec.axis is None else {"axis_i": spec.axis}
        zero = torch.zeros(tuple(scale.type().sizes() or ()), dtype=DTYPES[spec.format])
        zp = g.op("Constant", value_t=zero)
        q = g.op("QuantizeLinear", x, scale, zp, **attrs)
        return g.op("DequantizeLinear", q, scale, zp, **attrs)


class _FP8Format(TorchFormat):
    min_opset = 19  # FLOAT8 QuantizeLinear / DequantizeLinear

    def fake_quant(self, x, scale, zero_point, spec, grad_factor):
        """``fp8(clamp(x / s)) * s``, rounding straight through, LSQ's gradient for ``s`` (see the module)."""
        s = view(grad_scale(scale, grad_factor), x.shape, spec)
        top = core_fp8.fp8_max(spec.format)
        v = torch.clamp(x / s, -top, top)
        q = v + (round_fp8(v.detach(), spec.format) - v).detach()
        return q * s

    def export(self, x, scale, zero_point, spec):
        return _FP8QDQ.apply(x, scale, spec)


@register
class FP8E4M3(_FP8Format):
    name = "fp8_e4m3"


@register
class FP8E5M2(_FP8Format):
    name = "fp8_e5m2"
