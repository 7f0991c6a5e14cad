"""Binary weights (``QuantizerConfig(bits=1)``, XNOR-Net, Rastegari et al. 2016):

    scale = mean|w|   per output channel (or per tensor), recomputed from the weight at every forward
    w_q   = scale * sign(w)        (sign(0) = +1: codes {-1, +1})

Backward: the straight-through estimator with clipping of BinaryConnect (Courbariaux et al. 2015) and XNOR-Net:
``dL/dw = dL/dw_q`` where ``|w| <= CLIP`` (1), 0 elsewhere; the scale is a statistic of the weight, held constant
by the gradient (XNOR-Net's 1/n term through mean|w| is dropped). Exported as DequantizeLinear of int8 codes
{-1, +1} at the per-channel scale: ONNX Runtime dequantizes exactly ``scale * sign(w)``.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.core import QuantSpec
from lowbit.torch.formats.common import dequantize_codes, slice_reduce, ste, view
from lowbit.torch.formats.registry import TorchFormat

CLIP = 1.0  # |w| beyond which no gradient reaches a latent weight (BinaryConnect / XNOR-Net)


def binary_codes(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with ``sign(0) = +1``, as lowbit.core.quantize binarizes."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class BinaryFormat(TorchFormat):
    """1-bit uniform integers (``int`` at ``bits=1``); reached through :func:`lowbit.torch.formats.for_spec`."""

    name = "int"  # the core format: bits=1 of uniform integers

    def tensor_scale(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """mean|x| per slice (1 where a slice is all zeros)."""
        s = slice_reduce(x.detach().abs(), spec, lambda a: a.mean(1))
        return torch.where(s > 0, s, torch.ones_like(s))

    def fake_quant(self, x, scale, zero_point, spec, grad_factor):
        return ste(x, binary_codes(x) * view(scale, x.shape, spec), CLIP)

    def export(self, x, scale, zero_point, spec):
        codes = binary_codes(x.detach()).cpu().numpy().astype(np.int8)
        return dequantize_codes(codes, scale, spec)


BINARY = BinaryFormat()
