"""NumPy-only quantization numerics: :class:`QuantSpec` and pure functions over arrays."""

from lowbit.core.layout import broadcast, normalize_axis, param_shape, reduce
from lowbit.core.quant import (
    binarize,
    binary_scale,
    dequantize,
    fake_quant,
    mse_range_per_slice,
    qparams,
    qparams_from_tensor,
    quantize,
)
from lowbit.core.spec import ROUNDINGS, SCALE_KINDS, QuantSpec

__all__ = [
    "ROUNDINGS",
    "SCALE_KINDS",
    "QuantSpec",
    "binarize",
    "binary_scale",
    "broadcast",
    "dequantize",
    "fake_quant",
    "mse_range_per_slice",
    "normalize_axis",
    "param_shape",
    "qparams",
    "qparams_from_tensor",
    "quantize",
    "reduce",
]
