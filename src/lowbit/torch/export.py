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


def _fold_weight_quantizers(model_proto) -> None:
    """QuantizeLinear of a constant -> its integer codes as an initializer read by the DequantizeLinear."""
    import onnx
    from onnx import numpy_helper

    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    constants = {}
    for node in g.node:  # the TorchScript exporter also writes constants as Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return constants.get(name)

    # Identity of a constant (the exporter writes shared scales so): read the constant directly.
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and value(n.input[0]) is not None}
    for node in g.node:
        for i, name in enumerate(node.input):
            while name in alias:
                name = alias[name]
            node.input[i] = name
    graph_outputs = {o.name for o in g.output}
    drop = [n for n in g.node if n.op_type == "Identity" and n.output[0] in alias and n.output[0] not in graph_outputs]
    for n in drop:
        g.node.remove(n)
    keep = []
    new_inits = []
    for node in g.node:
        if node.op_type == "QuantizeLinear" and len(node.input) == 3:
            w, s, z = (value(n) for n in node.input)
            if w is not None and s is not None and z is not None and w.dtype == np.float32:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                shape = [1] * w.ndim
                if s.ndim == 1 and w.ndim > 0:
                    shape[axis] = -1
                q = np.clip(np.rint(w / s.reshape(shape)) + z.astype(np.float32).reshape(shape), *_limits(z.dtype))
                name = node.output[0]
                new_inits.append(numpy_helper.from_array(q.astype(z.dtype), name))
                continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    # Float weights no node reads any more.
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in list(g.initializer):
        if init.name not in used:
            g.initializer.remove(init)
    onnx.checker.check_model(model_proto)


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
