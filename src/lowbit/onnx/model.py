"""Load, check, preprocess and save ONNX models, with errors that say what is wrong and what to do.

Preprocessing is what ONNX Runtime's own basic graph optimizer does (constant folding, Conv+BatchNormalization and
Conv+Add/Mul fusion, removal of Identity/Dropout) followed by ONNX shape inference, so that every tensor has a type
and BatchNormalization is folded into the weights before they are quantized. Models over 2 GB travel as external
data in a temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import version_converter

from lowbit._io import atomic_open
from lowbit.data import whole_chunk
from lowbit.errors import FormatError
from lowbit.onnx.fp8 import uses_fp8
from lowbit.onnx.graph import subgraphs

# Per-axis QuantizeLinear/DequantizeLinear (per-channel weights) exist from opset 13 on.
MIN_OPSET = 13
# protobuf cannot serialize a message of 2 GB or more; stay well below it.
_PROTO_LIMIT = 1_800_000_000


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at ``path`` (external data included), with a clear error for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} does not exist or is not a file; pass the path of an .onnx model")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-like or OSError for missing data
        raise FormatError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise FormatError(f"{path} is not an ONNX model with a graph (no nodes found); check the file")
    highest = onnx.defs.onnx_opset_version()
    opset = default_opset(model)
    if opset > highest:
        raise FormatError(
            f"{path} uses ONNX opset {opset}, newer than the {highest} this onnx package knows; upgrade onnx "
            "(pip install -U onnx onnxruntime) or export the model at a lower opset"
        )
    return model


def upgrade_opset(model: onnx.ModelProto, version: int = MIN_OPSET) -> onnx.ModelProto:
    """``model`` converted to opset ``version`` when it is below (per-channel Q/DQ needs 13)."""
    opset = default_opset(model)
    if opset >= version:
        return model
    try:
        return version_converter.convert_version(model, version)
    except Exception as exc:
        raise FormatError(
            f"the model uses opset {opset}; lowbit needs opset {version} or newer and could not convert it "
            f"({exc}); export the model again with opset_version={version} or higher"
        ) from None


@contextlib.contextmanager
def _tempdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lowbit-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def is_large(model: onnx.ModelProto) -> bool:
    return model.ByteSize() > _PROTO_LIMIT


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically (weights as external data beside it when over 2 GB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_large(model):
        # The weights go to <name>.data beside the model; the model itself is still replaced in one rename.
        from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)  # the writer appends: start from an empty file
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        # Every tensor but scalars and short vectors (scales, zero points) goes out.
        convert_model_to_external_data(copy, all_tensors_to_one_file=True, location=data.name, size_threshold=64)
        model = write_external_data_tensors(copy, str(path.parent))
    with atomic_open(path, "wb") as f:
        f.write(model.SerializeToString())


def load_error(exc: Exception, advice: str) -> FormatError:
    """ONNX Runtime's refusal ``exc`` as one line, with what to do (``advice``)."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return FormatError(f"ONNX Runtime {ort.__version__} cannot load the model: {message}. {advice}")


def session_options(model: onnx.ModelProto, *, optimize: bool = True, threads: int = 0) -> ort.SessionOptions:
    """The options every ONNX Runtime session lowbit opens on a model takes: graph optimizations all on (as
    deployed), none with ``optimize=False``, and none on a model with FLOAT8 tensors
    (:func:`lowbit.onnx.fp8.uses_fp8`): ONNX Runtime 1.32's CPU computes FP8 Q/DQ wrongly with ORT_ENABLE_ALL, and
    E5M2 models wrongly with ORT_ENABLE_BASIC too (EfficientNet-Lite0: 0% top-1 agreement at BASIC, 52% with no
    graph optimization, which is what the model computes).
    ``threads``: intra-op threads (0: ORT's default)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif uses_fp8(model):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def session(
    model: onnx.ModelProto | str | os.PathLike, *, optimize: bool = True, threads: int = 0
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session over a model (in memory, or the file at a path) with
    :func:`session_options`; a clear error when ORT cannot load it."""
    path = None if isinstance(model, onnx.ModelProto) else Path(model)
    if path is not None:
        model = onnx.load(str(path), load_external_data=False)  # what session_options reads is in the graph
    options = session_options(model, optimize=optimize, threads=threads)
    try:
        if path is not None:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if not is_large(model):
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with _tempdir() as tmp:
            save_model(model, tmp / "model.onnx")
            return ort.InferenceSession(str(tmp / "model.onnx"), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise load_error(exc, "lowbit produced a model ONNX Runtime rejects: please report it") from None


def preprocess(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, BatchNormalization folded into Conv, Identity/Dropout removed, shapes inferred.

    Runs ONNX Runtime's basic (hardware-independent, standard-ops-only) optimizer, so a model ORT cannot load
    fails here with a clear message.
    """
    model = upgrade_opset(model)
    with _tempdir() as tmp:
        src, dst = tmp / "in.onnx", tmp / "out.onnx"
        save_model(model, src)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(dst)
        if is_large(model):
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "out.onnx.data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            advice = "lowbit calibrates with ONNX Runtime, so the float model must run in it first"
            raise load_error(exc, advice) from None
        optimized = onnx.load(str(dst))
    _drop_unused_domains(optimized)
    # ORT keeps the producer's opset imports; shape inference gives every intermediate tensor its type.
    try:
        return onnx.shape_inference.infer_shapes(optimized)
    except Exception:
        return optimized


def _drop_unused_domains(model: onnx.ModelProto) -> None:
    """ORT's optimizer declares every domain it knows; keep the ones the graph uses."""
    used = {""}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            used.add(node.domain)
            for sub in subgraphs(node):
                visit(sub)

    visit(model.graph)
    keep = [op for op in model.opset_import if op.domain in used or op.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk, external data files included."""
    path = Path(path)
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def input_specs(model: onnx.ModelProto) -> list[tuple[str, np.dtype, tuple]]:
    """(name, dtype, shape with None for free dimensions) of every graph input that is not an initializer."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for info in model.graph.input:
        if info.name in inits:
            continue
        t = info.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else np.dtype("float32")
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        specs.append((info.name, dtype, shape))
    return specs


SIZE_KEYS = (
    "imgsz",
    "img_size",
    "image_size",
    "input_size",
    "imgsize",
)  # metadata keys exporters write (Ultralytics: imgsz)


def metadata_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    """The input height and width a model's metadata states (``imgsz: [640, 640]``, ``image_size: 224``), if any."""
    props = {p.key.lower(): p.value for p in model.metadata_props}
    for key in SIZE_KEYS:
        if key not in props:
            continue
        numbers = [int(n) for n in re.findall(r"\d+", props[key])]
        if len(numbers) == 1 and numbers[0] > 0:
            return numbers[0], numbers[0]
        if len(numbers) == 2 and min(numbers) > 0:
            return numbers[0], numbers[1]
    return None


def batch_size_for(inputs, requested: int) -> int:
    """The batch size to run a model at: the one its inputs fix (every input with a fixed first dimension
    agreeing), else ``requested``."""
    whole = whole_chunk(inputs)  # a recurrent state's fixed first axis is its layers, not the batch
    fixed = {s.shape[0] for s in inputs if s.name not in whole and s.shape and s.shape[0] is not None}
    if len(fixed) == 1:
        return fixed.pop()
    return requested


BATCH_CHECK_ROWS = 4  # samples of the check batch compared with the model run on each alone


def _check_feed(specs, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """Distinct random samples for float inputs (a graph that mixes samples then shows it), zeros for others."""
    feed = {}
    for name, dtype, shape in specs:
        if any(d is None for d in shape[1:]):
            return None  # a free inner dimension: no size is known to work
        size = (batch, *shape[1:])
        feed[name] = rng.standard_normal(size).astype(dtype) if dtype.kind == "f" else np.zeros(size, dtype)
    return feed


def free_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto | None:
    """A copy of ``model`` whose inputs and outputs take any batch size, for a model whose inputs fix their first
    dimension at 1; None when it cannot be made so. The copy has the same graph, with the first dimension of every
    input and output made symbolic and the inferred intermediate shapes dropped. It is kept only when one run at
    ``batch`` on random samples gives each of the first :data:`BATCH_CHECK_ROWS` samples the outputs the model
    gives it alone: a Reshape to a constant ``[1, -1]``, a reduction over the batch axis or an output without a
    batch axis break that, and the model then runs at batch 1 only.

    >>> fixed = free_batch(model, 8)  # doctest: +SKIP
    >>> run = fixed if fixed is not None else model  # doctest: +SKIP
    """
    specs = input_specs(model)
    if batch <= 1 or not specs or any(not shape or shape[0] != 1 for _, _, shape in specs):
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name for t in out.graph.initializer}
    for info in [*(i for i in out.graph.input if i.name not in inits), *out.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if not len(dims) or (dims[0].HasField("dim_value") and dims[0].dim_value != 1):
            return None  # an output with no batch axis, or one fixed at another size
        dims[0].dim_param = "batch"
    del out.graph.value_info[:]
    try:
        out = onnx.shape_inference.infer_shapes(out)
    except Exception:
        pass  # ONNX Runtime infers the shapes itself; the check run below decides
    feed = _check_feed(specs, batch, np.random.default_rng(0))
    if feed is None:
        return None
    try:
        freed = session(out).run(None, feed)
        alone = session(model)
        for i in range(min(batch, BATCH_CHECK_ROWS)):
            one = alone.run(None, {k: v[i : i + 1] for k, v in feed.items()})
            for a, b in zip(one, freed, strict=True):
                if b.shape != (batch, *a.shape[1:]) or not _close(a, b[i : i + 1]):
                    return None
    except Exception:  # ONNX Runtime rejects the copy (a shape fixed inside the graph): batch 1 it is
        return None
    return out


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding (a batched kernel may sum in another order)."""
    if a.dtype.kind not in "fc":
        return bool(np.array_equal(a, b))
    scale = float(np.abs(a[np.isfinite(a)]).max(initial=0.0))
    return bool(np.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1.0), equal_nan=True))
