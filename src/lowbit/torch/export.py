"""Export a quantized PyTorch model as an ONNX model with explicit QuantizeLinear/DequantizeLinear nodes.

Every quantizer in ``"quantize"`` mode becomes a QuantizeLinear + DequantizeLinear pair (per-axis scales for
per-channel weights, opset 13+), which TensorRT 8+ and ONNX Runtime read as explicit quantization. Weights are
stored as integers: the QuantizeLinear of a constant weight is computed here, and its DequantizeLinear reads an
int8 initializer (a quarter of the float size). Activations below 8 bits (or narrow-range ones) travel through int8
Q/DQ after a Clip to their narrower grid, so ONNX Runtime computes exactly what the fake quantization computed;
weights are clipped to their grid before their codes are stored.

``opset=21`` (reached from the TorchScript exporter's opset 20 with onnx's version converter) stores 4-bit weights
as INT4 (an eighth of the float size) and writes per-group weights as blocked DequantizeLinear (``block_size``);
per-group quantizers need it. ``opset=25`` also stores 2-bit uniform weights as INT2 (a sixteenth; ONNX Runtime 1.32
loads and runs them). Binary and ternary weights travel as int8 codes at any opset
(:func:`lowbit.torch.packed_weight_bytes` says what they take packed).

The output path is checked first (that a file can be created there), before any tracing; the example inputs are
run through the model before the export; the file is written atomically (a temporary file renamed into place) and
checked with ``onnx.checker``: a failure leaves no half-written file.

FP8 quantizers (``format="fp8_e4m3"`` / ``"fp8_e5m2"``) export as QuantizeLinear/DequantizeLinear with a
FLOAT8E4M3FN / FLOAT8E5M2 zero point (opset 19+, the default opset of a model that has one), their weights stored as
FLOAT8 initializers (one byte each), computed by ONNX's own saturating QuantizeLinear.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit._io import atomic_open
from lowbit.errors import CalibrationError, SpecError
from lowbit.paths import check_outputs
from lowbit.torch import formats
from lowbit.torch.config import RECIPE_ATTRIBUTE
from lowbit.torch.quantizer import TensorQuantizer, evaluating

DEFAULT_OPSET = 17
TRACE_MAX_OPSET = 20  # the TorchScript exporter's newest; later opsets are reached with onnx's version converter
MAX_OPSET = 25
NARROW_INTS = {4: 21, 2: 25}  # weight bits -> the opset from which ONNX stores them as INT4/UINT4, INT2/UINT2


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
    "Tile", "Unsqueeze", "Squeeze", "Transpose", "Slice", "Flatten", "Concat", "Gather", "Shape", "Round", "Where",
    "Equal",
}  # fmt: skip


def _fold_weight_quantizers(model_proto) -> None:
    """Evaluate every node of the cheap kinds above whose inputs are all constants, then turn each QuantizeLinear
    of a constant into its integer codes, an initializer read by the DequantizeLinear."""
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


def _prune(model_proto) -> None:
    """Drop the initializers and Constant nodes no node reads any more (float weights, folded intermediates)."""
    g = model_proto.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in list(g.initializer):
        if init.name not in used:
            g.initializer.remove(init)
    for node in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(node)


def _quantize(node, w: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """ONNX QuantizeLinear of a constant: ``clip(rint(w / s) + z)`` in z's integer type (half to even), per
    tensor, per axis or in blocks (``block_size``, opset 21)."""
    if z.dtype.name.startswith("float8"):  # FP8 weights: ONNX's own saturating cast, which lowbit.core matches
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(node).run(None, dict(zip(node.input, (w, s, z), strict=True)))[0]
    attrs = {a.name: a.i for a in node.attribute}
    axis = attrs.get("axis", 1) % max(w.ndim, 1)
    block = attrs.get("block_size", 0)
    if block:
        s = np.repeat(s, block, axis=axis).take(range(w.shape[axis]), axis=axis)
        z = np.repeat(z, block, axis=axis).take(range(w.shape[axis]), axis=axis)
    elif s.ndim == 1 and w.ndim > 0:
        shape = [1] * w.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    q = np.rint(w / s) + z.astype(np.float32)
    return np.clip(q, *_limits(z.dtype)).astype(z.dtype)


def _set_block_sizes(model_proto, specs: dict) -> None:
    """``block_size`` on the Q/DQ nodes of per-group quantizers (blocked quantization, opset 21)."""
    import onnx

    for node in model_proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in specs:
            spec = specs[node.input[1]]
            if spec.group_size is not None:
                node.attribute.append(onnx.helper.make_attribute("block_size", spec.group_size))


def _use_narrow_ints(model_proto, specs: dict, opset: int) -> None:
    """4-bit weights as INT4/UINT4 DequantizeLinear of INT4 codes (opset 21 on: half the bytes of int8), 2-bit
    uniform weights as INT2/UINT2 (opset 25 on: a quarter), as :data:`NARROW_INTS` says.

    4-bit activations keep int8 Q/DQ after a Clip to their 4-bit grid (the same values): ONNX Runtime 1.31's int4
    QuantizeLinear wraps values beyond the range around instead of saturating them (seen: a ReLU output of 4.8 at
    scale 0.59 came back -4.76), and its Clip+QuantizeLinear fusion fails on an int4 zero point."""
    from onnx import TensorProto, helper, numpy_helper

    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    constants = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    converted: dict[str, str] = {}

    kinds = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4}
    kinds.update({(2, True): TensorProto.INT2, (2, False): TensorProto.UINT2})

    def narrow(name: str, bits: int, signed: bool) -> str:
        if name not in converted:
            source = inits[name] if name in inits else constants[name].attribute[0].t
            values = numpy_helper.to_array(source).astype(np.int32)
            new = f"{name}_{'' if signed else 'u'}int{bits}"
            kind = kinds[bits, signed]
            g.initializer.append(helper.make_tensor(new, kind, values.shape, values.flatten().tolist()))
            converted[name] = new
        return converted[name]

    for node in g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.input[1] not in specs:
            continue
        spec = specs[node.input[1]]
        if spec.format != "int" or opset < NARROW_INTS.get(spec.bits, MAX_OPSET + 1):
            continue
        if len(node.input) < 3 or node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        node.input[0] = narrow(node.input[0], spec.bits, spec.signed)  # the weight's codes
        node.input[2] = narrow(node.input[2], spec.bits, spec.signed)
    if converted:
        del g.value_info[:]  # shape inference's records still say int8


def _limits(dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _resolve_opset(opset: int | None, specs: dict) -> int:
    """The opset asked for (default 17, or the newest a quantizer's format needs: 19 for FP8), checked against what
    the quantizers' formats need (:attr:`lowbit.torch.formats.TorchFormat.min_opset`)."""
    needs = {name[: -len(".scale")]: (spec, formats.for_spec(spec)) for name, spec in specs.items()}
    needs = {name: (spec.format, fmt.min_opset) for name, (spec, fmt) in needs.items() if fmt is not None}
    least = max((n for _, n in needs.values()), default=13)
    opset = max(DEFAULT_OPSET, least) if opset is None else opset
    if not 13 <= opset <= MAX_OPSET:
        raise SpecError(f"opset must be 13 (per-channel QuantizeLinear) to {MAX_OPSET}, got {opset}")
    short = [(name, fmt, n) for name, (fmt, n) in needs.items() if n > opset]
    if short:
        name, fmt, n = short[0]
        raise SpecError(
            f"opset={opset}: {len(short)} quantizer(s) need a newer opset ({name}: format {fmt!r}, whose Q/DQ ONNX "
            f"has from opset {n} on); export with opset={least} or later"
        )
    return opset


def _off_cpu(model: nn.Module, args: tuple[Any, ...]) -> bool:
    tensors = itertools.chain(model.parameters(), model.buffers(), (a for a in args if isinstance(a, torch.Tensor)))
    return any(t.device.type != "cpu" for t in tensors)


def _describe_inputs(args: tuple[Any, ...]) -> str:
    return ", ".join(
        f"a tensor of shape {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__ for a in args
    )


def _run_example(model: nn.Module, args: tuple[Any, ...]) -> Any:
    try:
        with torch.no_grad():
            return model(*args)
    except Exception as exc:  # the user's inputs (or model): say which argument and what it must be
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SpecError(
            f"example_inputs ({_describe_inputs(args)}) do not fit the model: running it failed "
            f"({type(exc).__name__}: {reason}). Pass what the model's forward takes, a tensor or a tuple of "
            "positional inputs, shaped like one batch of its calibration data"
        ) from exc


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[Any, ...],
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Write ``model`` (quantized and calibrated) to ``path`` as a Q/DQ ONNX model; returns the path.

    ``example_inputs``: a tensor or a tuple of positional inputs (inputs that the model cannot run on raise
    :class:`~lowbit.errors.SpecError`; a ``path`` where no file can be written, :class:`~lowbit.paths.PathError`,
    both before any tracing). ``opset``: 13 to 25 (21: INT4 weights and per-group weights, 25: INT2 weights, see
    the module docstring; FP8 needs 19+); default 17, or 19 with FP8 quantizers.
    ``dynamic_batch``: the first axis of every input and output is named ``batch`` so that any batch size runs.
    ``dynamic_axes`` (instead): the named axes of each input and output, ``{"input_ids": {0: "batch", 1:
    "sequence"}, ...}``, as ``torch.onnx.export`` takes them.
    A model on a GPU is traced from a CPU copy of it and left where it is.
    """
    import onnx

    specs = {
        f"{name}.scale": q.spec
        for name, q in model.named_modules()
        if isinstance(q, TensorQuantizer) and q.mode == "quantize"
    }
    opset = _resolve_opset(opset, specs)
    _check_ready(model)
    grouped = [name[: -len(".scale")] for name, spec in specs.items() if spec.group_size is not None]
    if grouped and opset < 21:
        raise SpecError(
            f"{len(grouped)} quantizer(s) are per group ({grouped[0]}, ...): ONNX has blocked QuantizeLinear from "
            "opset 21 on; export with opset=21"
        )
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    check_outputs({"path": path}, {})  # a PathError now rather than after the tracing
    path = Path(path)
    buffer = io.BytesIO()
    n_in = len(args)
    input_names = input_names or (["input"] if n_in == 1 else [f"input_{i}" for i in range(n_in)])
    if _off_cpu(model, args):
        # The TorchScript exporter's constant folding mixes its CPU constants with CUDA tensors (a BatchNorm kept
        # training for QAT fails so): trace a CPU copy. The model itself stays where it is.
        model = copy.deepcopy(model).cpu()
        args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    with evaluating(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            out = _run_example(model, args)
            n_out = len(out) if isinstance(out, (tuple, list)) else 1
            output_names = output_names or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
            if dynamic_axes is None and dynamic_batch:
                dynamic_axes = {n: {0: "batch"} for n in [*input_names, *output_names]}
            torch.onnx.export(
                model,
                args,
                buffer,
                dynamo=False,
                opset_version=min(opset, TRACE_MAX_OPSET),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    proto = _finish(onnx.load_from_string(buffer.getvalue()), specs, opset)
    _record_recipe(model, proto)
    onnx.checker.check_model(proto)
    with atomic_open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


def _finish(proto, specs: dict, opset: int):
    """The traced model at ``opset``, its per-group Q/DQ blocked, its weights stored as integer codes (INT4/INT2
    where the opset has them), what nothing reads any more dropped."""
    if opset > TRACE_MAX_OPSET:
        from onnx import version_converter

        proto = version_converter.convert_version(proto, opset)
    _set_block_sizes(proto, specs)
    _fold_weight_quantizers(proto)
    if opset >= min(NARROW_INTS.values()):
        _use_narrow_ints(proto, specs, opset)
    _prune(proto)
    return proto


def _record_recipe(model: nn.Module, proto) -> None:
    """The recipe :func:`lowbit.torch.quantize` resolved for ``model``, into the file's metadata (``lowbit.recipe``,
    JSON), as ``lowbit quantize`` writes it into ``.ranges.json``."""
    import onnx

    recipe = getattr(model, RECIPE_ATTRIBUTE, None)
    if recipe is not None:
        onnx.helper.set_model_props(proto, {"lowbit.recipe": json.dumps(recipe)})
