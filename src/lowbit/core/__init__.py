"""NumPy-only quantization numerics: :class:`QuantSpec` and pure functions over arrays."""

from lowbit.core import formats
from lowbit.core.formats import fp8, log2, ternary  # noqa: F401  (each registers its format)
from lowbit.core.layout import broadcast, normalize_axis, param_shape, reduce
from lowbit.core.quant import (
    ADMM_STARTS,
    WEIGHT_METHODS,
    admm_range_per_slice,
    binarize,
    binary_scale,
    check_admm_options,
    check_weight_method,
    dequantize,
    fake_quant,
    fitted_qparams,
    mse_range_per_slice,
    percentile_range_per_slice,
    pow2_ceil,
    qparams,
    qparams_from_tensor,
    quantize,
    weight_range,
)
from lowbit.core.spec import ROUNDINGS, SCALE_KINDS, QuantSpec

__all__ = [
    "ADMM_STARTS",
    "ROUNDINGS",
    "SCALE_KINDS",
    "WEIGHT_METHODS",
    "QuantSpec",
    "admm_range_per_slice",
    "binarize",
    "binary_scale",
    "broadcast",
    "check_admm_options",
    "check_weight_method",
    "dequantize",
    "fake_quant",
    "fitted_qparams",
    "formats",
    "mse_range_per_slice",
    "normalize_axis",
    "param_shape",
    "percentile_range_per_slice",
    "pow2_ceil",
    "qparams",
    "qparams_from_tensor",
    "quantize",
    "reduce",
    "weight_range",
]
