"""What the PyTorch number formats share: parameters laid out against a tensor, the clipped straight-through
estimator, and the traced DequantizeLinear of constant integer codes."""

from __future__ import annotations

import numpy as np
import torch

from lowbit.core import QuantSpec, layout


def view(param: torch.Tensor, shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
    """A scale of :func:`lowbit.core.layout.param_shape` expanded to broadcast against ``shape``."""
    if spec.axis is None:
        return param.reshape(())
    axis = layout.normalize_axis(spec.axis, len(shape))
    if spec.group_size is None:
        dims = [1] * len(shape)
        dims[axis] = shape[axis]
        return param.reshape(dims)
    return param.repeat_interleave(spec.group_size, dim=axis).narrow(axis, 0, shape[axis])


def slice_reduce(x: torch.Tensor, spec: QuantSpec, fn) -> torch.Tensor:
    """``fn(flat)`` over each slice of ``x`` (per tensor or per channel; ``fn`` reduces dim 1 of a 2-D tensor)."""
    if spec.group_size is not None:
        raise ValueError("per-group binary/ternary weights are not supported: use granularity 'channel' or 'tensor'")
    if spec.axis is None:
        return fn(x.reshape(1, -1)).reshape(())
    axis = layout.normalize_axis(spec.axis, x.dim())
    return fn(x.movedim(axis, 0).reshape(x.shape[axis], -1))


def grad_scale(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` forward, its gradient times ``factor`` backward (LSQ's step-size gradient scale)."""
    return t if factor == 1.0 else t * factor + (t - t * factor).detach()


def ste(x: torch.Tensor, value: torch.Tensor, clip: float | torch.Tensor) -> torch.Tensor:
    """``value`` forward; backward the gradient reaches ``x`` unchanged where ``|x| <= clip`` and not elsewhere
    (the straight-through estimator with clipping of BinaryConnect and XNOR-Net)."""
    inside = (x.abs() <= clip).to(x.dtype)
    return value.detach() + (x - x.detach()) * inside


def constant(a: np.ndarray) -> torch.Tensor:
    """A NumPy array as a tensor the ONNX tracer records as a constant (not as ops on a parameter)."""
    return torch.from_numpy(np.ascontiguousarray(a))


class DequantizeCodes(torch.autograd.Function):
    """``codes * scale`` (int8 codes, a float scale per tensor or along ``axis``), traced as one
    DequantizeLinear of the int8 codes with zero point 0."""

    @staticmethod
    def forward(ctx, codes, scale, axis: int | None):
        s = scale if axis is None or scale.dim() == 0 else scale.reshape([-1 if i == axis else 1
                                                                          for i in range(codes.dim())])  # fmt: skip
        return codes.to(torch.float32) * s

    @staticmethod
    def symbolic(g, codes, scale, axis):
        zero = g.op("Constant", value_t=torch.zeros(scale.type().sizes() or [], dtype=torch.int8))
        attrs = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", codes, scale, zero, **attrs)


def dequantize_codes(codes: np.ndarray, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The traced form of a weight stored as int8 ``codes`` at ``scale``: DequantizeLinear(codes, scale, 0)."""
    axis = None if spec.axis is None else layout.normalize_axis(spec.axis, codes.ndim)
    scale = scale.detach().reshape(()) if axis is None else scale.detach().reshape(-1)
    return DequantizeCodes.apply(constant(codes.astype(np.int8)), scale.float(), axis)
