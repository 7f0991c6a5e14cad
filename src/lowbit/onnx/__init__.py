"""ONNX in, ONNX out: calibrate with ONNX Runtime, place Q/DQ for a target runtime, static and dynamic.

import lowbit.onnx
result = lowbit.onnx.quantize("model.onnx", "model_int8.onnx", "calib.npz", "int8_trt")
analysis = lowbit.onnx.analyze("model.onnx", "calib.npz", "int8")
"""

from lowbit.onnx.analyze import analyze
from lowbit.onnx.pipeline import QuantizeResult, quantize
from lowbit.onnx.settings import Budget, Options, Settings

__all__ = ["Budget", "Options", "QuantizeResult", "Settings", "analyze", "quantize"]
