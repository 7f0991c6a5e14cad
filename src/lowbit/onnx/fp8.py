"""FP8 (E4M3FN, E5M2) in the ONNX front end: what an FP8 build stores, and how ONNX Runtime must run it.

An FP8 build is the integer build on another grid (:mod:`lowbit.core.formats.fp8`): a QuantizeLinear /
DequantizeLinear pair per activation (per tensor) and weights per output channel stored as FLOAT8 initializers
(1 byte each) behind a DequantizeLinear, every zero point a FLOAT8 +0.0 (its type is what makes the pair FP8):

    code = fp8(x / scale)      round to nearest even, saturating; scale = amax / 448 (E4M3FN) or amax / 57344 (E5M2)
    x   ~ value(code) * scale

Biases stay float: ONNX has no FP8 bias convention (an int32 bias at ``s_x * s_w`` belongs to integer
kernels), and TensorRT's FP8 keeps biases in higher precision. FLOAT8 Q/DQ needs opset 19 or newer.

ONNX Runtime's CPU has no FP8 kernels: it emulates (float kernels between casts to and from float8), and
ONNX Runtime 1.32 computes FP8 Q/DQ models wrongly with its default graph optimizations (ORT_ENABLE_ALL: wrong
outputs, or a failed Clip + QuantizeLinear fusion with a FLOAT8 zero point). Every session lowbit opens on a
model that :func:`uses_fp8` runs with ORT_DISABLE_ALL (:func:`lowbit.onnx.model.session_options`), and users
must do the same (:data:`ORT_ADVICE`).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import version_converter

from lowbit.core.formats.fp8 import FP8_FORMATS
from lowbit.errors import FormatError
from lowbit.onnx.graph import graphs

OPSET = 19  # FLOAT8 QuantizeLinear / DequantizeLinear
DTYPES = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
TENSOR_TYPES = {"fp8_e4m3": onnx.TensorProto.FLOAT8E4M3FN, "fp8_e5m2": onnx.TensorProto.FLOAT8E5M2}
LABELS = {"int": "INT8", "fp8_e4m3": "FP8 E4M3", "fp8_e5m2": "FP8 E5M2"}
_FLOAT8 = {
    onnx.TensorProto.FLOAT8E4M3FN,
    onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2,
    onnx.TensorProto.FLOAT8E5M2FNUZ,
}
ORT_ADVICE = (
    "run the FP8 model in ONNX Runtime with sess_options.graph_optimization_level = "
    "onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL: ONNX Runtime 1.32's CPU computes FLOAT8 Q/DQ wrongly "
    "with its default ORT_ENABLE_ALL (and E5M2 with ORT_ENABLE_BASIC too), and it has no FP8 kernels (it "
    "emulates: no speed-up; TensorRT on Hopper runs FP8)"
)


def is_fp8(fmt: str) -> bool:
    """Whether the number format ``fmt`` is one of the FP8 formats."""
    return fmt in FP8_FORMATS


def label(fmt: str) -> str:
    """How tables name a model of format ``fmt`` ("INT8", "FP8 E4M3", "FP8 E5M2")."""
    return LABELS.get(fmt, fmt.upper())


def stored(codes: np.ndarray, fmt: str) -> np.ndarray:
    """``codes`` as the array an initializer is made from: FP8 codes (uint8 bit patterns) viewed as ml_dtypes'
    float8 type, so that ``onnx.numpy_helper.from_array`` writes a FLOAT8 tensor of the same bytes; integer codes
    unchanged.

    >>> stored(np.array([56, 0], np.uint8), "fp8_e4m3").astype(np.float32).tolist()
    [1.0, 0.0]
    """
    if not is_fp8(fmt):
        return codes
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"{fmt} codes are uint8 bit patterns, got {codes.dtype}")
    return codes.view(DTYPES[fmt])


def uses_fp8(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds a FLOAT8 tensor anywhere (If/Loop/Scan bodies too): an initializer (a FLOAT8 zero
    point or weight), a Constant, or a typed graph input, output or value."""
    for g in graphs(model.graph):
        if any(t.data_type in _FLOAT8 for t in g.initializer):
            return True
        if any(i.type.tensor_type.elem_type in _FLOAT8 for i in [*g.input, *g.output, *g.value_info]):
            return True
        constants = (a.t for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
        if any(t.data_type in _FLOAT8 for t in constants):
            return True
    return False


def raised(model: onnx.ModelProto, fmt: str) -> onnx.ModelProto:
    """``model`` at opset :data:`OPSET` (19) or newer, where FLOAT8 Q/DQ exist: the model itself when it is
    there, else converted by ``onnx.version_converter``; a one-line FormatError when that fails."""
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 1)
    if opset >= OPSET:
        return model
    try:
        return version_converter.convert_version(model, OPSET)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(
            f"--format {fmt}: FLOAT8 Q/DQ need opset {OPSET}, and onnx.version_converter could not raise the "
            f"model from opset {opset} ({first}); export it at opset {OPSET} or newer"
        ) from None
