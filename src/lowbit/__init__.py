"""lowbit: quantize neural networks to INT8 and below without losing their accuracy.

Numbers flow one way: data -> statistics (:mod:`lowbit.calib`) -> ranges -> quantization parameters
(:mod:`lowbit.core`) -> a rewritten model -> a report.
"""

from lowbit.core import QuantSpec, dequantize, fake_quant, qparams, quantize
from lowbit.errors import CalibrationError, LowbitError, SpecError

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "LowbitError",
    "QuantSpec",
    "SpecError",
    "__version__",
    "dequantize",
    "fake_quant",
    "qparams",
    "quantize",
]
