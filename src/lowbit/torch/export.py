"""Export a quantized PyTorch model as an ONNX model with explicit QuantizeLinear/DequantizeLinear nodes.

Every quantizer in ``"quantize"`` mode becomes a QuantizeLinear + DequantizeLinear pair (per-axis scales for
per-channel weights, opset 13+), which TensorRT 8+ and ONNX Runtime read as explicit quantization. Weights are
stored as integers: the QuantizeLinear of a constant weight is computed here, and its DequantizeLinear reads an
int8 initializer (a quarter of the float size). Activations below 8 bits travel through int8 Q/DQ after a Clip to
their narrower grid, so ONNX Runtime computes exactly what the fake quantization computed.

The file is written atomically (a temporary file renamed into place) and checked with ``onnx.checker``.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import CalibrationError, SpecError
from lowbit.torch.quantizer import TensorQuantizer

DEFAULT_OPSET = 17


def _check_ready(model: nn.Module) -> None:
    enabled = {n: q for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.mode != "disabled"}
    if not enabled:
        raise CalibrationError(
            "the model has no enabled quantizer: quantize it first (lowbit.torch.quantize), or export it with "
            "torch.onnx.export if you want the float model"
        )
    dynamic = [n for n, q in enabled.items() if q.dynamic]
    if dynamic:
        raise SpecError(
            f"{len(dynamic)} quantizer(s) are dynamic ({dynamic[0]}, ...): ONNX has no Q/DQ form for scales computed "
            "at run time. Export the float model and run `lowbit quantize MODEL.onnx --dynamic` on it instead"
        )
    wide = [n for n, q in enabled.items() if q.spec.bits > 8]
    if wide:
        raise SpecError(
            f"{len(wide)} quantizer(s) use more than 8 bits ({wide[0]}, ...): export writes 8-bit Q/DQ; "
            "keep those layers in float (override them with None) or use 8 bits or fewer"
        )
    waiting = [n for n, q in enabled.items() if q.mode == "calibrate" or not q.calibrated]
    if waiting:
        raise CalibrationError(
            f"{len(waiting)} quantizer(s) are not calibrated yet ({waiting[0]}, ...): run lowbit.torch.quantize "
            "with calib= (or lowbit.torch.calibrate) before exporting"
        )


# Cheap elementwise and shape ops that the TorchScript exporter leaves on constants (the per-channel clip of a
# weight narrower than int8, a BatchNorm fold computed in forward): evaluated here so that weights end as integers.
_FOLDABLE = {
    "Abs", "Add", "Cast", "Clip", "Div", "Expand", "Identity", "Max", "Min", "Mul", "Neg", "Reshape", "Sqrt", "Sub",
    "Tile", "Unsqueeze", "Squeeze", "Transpose",
}  # fmt: skip


def _fold_weight_quantizers(model_proto) -> None:
    """Evaluate every node of the cheap kinds above whose inputs are all constants, then turn each QuantizeLinear
    of a constant into its integer codes, an initializer read by the DequantizeLinear."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model_proto.graph
    graph_outputs = {o.name for o in g.output}
    constants = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    keep, new_inits = [], []
    for node in g.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            keep.append(node)
            continue
        inputs = [n for n in node.input if n]
        if not inputs or not all(n in constants for n in inputs) or any(o in graph_outputs for o in node.output):
            keep.append(node)
            continue
        if node.op_type in _FOLDABLE:
            outputs = ReferenceEvaluator(node).run(None, {n: constants[n] for n in inputs})
        elif node.op_type == "QuantizeLinear" and len(node.input) == 3 and constants[node.input[0]].dtype == np.float32:
            outputs = [_quantize(node, *(constants[n] for n in node.input))]
        else:
            keep.append(node)
            continue
        for name, value in zip(node.output, outputs, strict=True):
            constants[name] = np.asarray(value)
            new_inits.append(numpy_helper.from_array(np.asarray(value), name))
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    # Constants no node reads any more (float weights, the intermediate results folded above).
    used = {i for n in g.node for i in n.input} | graph_outputs
    for init in list(g.initializer):
        if init.name not in used:
            g.initializer.remove(init)
    for node in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(node)
    onnx.checker.check_model(model_proto)


def _quantize(node, w: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """ONNX QuantizeLinear of a constant: ``clip(rint(w / s) + z)`` in z's integer type (half to even)."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * w.ndim
    if s.ndim == 1 and w.ndim > 0:
        shape[axis] = -1
    q = np.rint(w / s.reshape(shape)) + z.astype(np.float32).reshape(shape)
    return np.clip(q, *_limits(z.dtype)).astype(z.dtype)


def _limits(dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[Any, ...],
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Write ``model`` (quantized and calibrated) to ``path`` as a Q/DQ ONNX model; returns the path.

    ``example_inputs``: a tensor or a tuple of positional inputs. ``dynamic_batch``: the first axis of every
    input and output is named ``batch`` so that any batch size runs.
    """
    import onnx

    if opset < 13:
        raise SpecError(f"opset {opset} has no per-channel QuantizeLinear; use opset 13 or newer")
    _check_ready(model)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    path = Path(path)
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    n_in = len(args)
    input_names = input_names or (["input"] if n_in == 1 else [f"input_{i}" for i in range(n_in)])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            with torch.no_grad():
                out = model(*args)
            n_out = len(out) if isinstance(out, (tuple, list)) else 1
            output_names = output_names or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
            dynamic_axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
            torch.onnx.export(
                model,
                args,
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    _fold_weight_quantizers(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
