"""Where does INT8 really run? Profile a model in ONNX Runtime and report, per node, the kernel that ran.

ONNX Runtime rewrites a Q/DQ model when it loads it: DequantizeLinear -> Conv -> QuantizeLinear becomes one
QLinearConv, and so on. What a model costs is what runs after that rewriting, so this reads ONNX Runtime's own
profile: every kernel, its type, the element types it read and its time. A kernel is

- ``convert`` for QuantizeLinear/DequantizeLinear that were left standing (each pays a pass over its tensor);
- ``move`` when it only moves or copies elements (Transpose, Reshape, Flatten, Concat, Slice, Gather, ONNX
  Runtime's layout reorders, ...; see :data:`MOVE`), whatever their type: a Flatten of uint8 is no integer arithmetic;
- ``integer`` when it computes on 8- or 4-bit integers (QLinearConv, QGemm, a MaxPool on uint8, ...);
- ``float`` when it computes on floating point. A Conv, Gemm or MatMul on float is flagged: it was meant to run on
  integers and did not;
- ``other`` for the rest: arithmetic on indices and shapes (int32, int64, bool).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lowbit._table import format_table
from lowbit.errors import FormatError
from lowbit.onnx.model import is_large, load_error, save_model, session_options

CONVERT = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
MATRIX = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}
# Kernels that only move, copy or select elements (with their ONNX Runtime contrib and layout-optimizer forms)
MOVE = {
    "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather", "GatherElements",
    "GatherND", "ScatterND", "ScatterElements", "Identity", "Expand", "Tile", "Pad", "DepthToSpace", "SpaceToDepth",
    "Shape", "Size", "Compress", "ReverseSequence", "Dropout", "ReorderInput", "ReorderOutput", "MemcpyFromHost",
    "MemcpyToHost",
}  # fmt: skip
INTEGER_TYPES = {"int8", "uint8", "int4", "uint4"}
FLOAT_TYPES = {"float", "float16", "bfloat16", "double", "float8e4m3fn", "float8e5m2"}
KINDS = ("integer", "float", "convert", "move", "other")
_SUFFIX = re.compile(r"(_token_\d+)?_kernel_time$")


@dataclass
class Kernel:
    """One node as ONNX Runtime ran it: its name, the kernel's op type, its kind, and its mean time (ms)."""

    node: str
    op: str
    kind: str
    ms: float
    input_types: list[str] = field(default_factory=list)

    @property
    def float_matrix(self) -> bool:
        """A matrix op that ran on float: quantization did not reach it."""
        return self.kind == "float" and self.op in MATRIX


@dataclass
class Profile:
    kernels: list[Kernel]
    runs: int
    batch: int

    def total_ms(self, kind: str | None = None) -> float:
        return sum(k.ms for k in self.kernels if kind is None or k.kind == kind)

    def summary(self) -> str:
        total = self.total_ms() or 1.0
        found = {k.kind for k in self.kernels}
        parts = [
            f"{kind} {self.total_ms(kind):.3f} ms ({self.total_ms(kind) / total * 100:.0f}%)"
            for kind in KINDS
            if kind in ("integer", "float", "convert") or kind in found
        ]
        text = f"{len(self.kernels)} kernels, {self.total_ms():.3f} ms per run at batch {self.batch}: " + ", ".join(
            parts
        )
        flagged = [k.node for k in self.kernels if k.float_matrix]
        if flagged:
            text += f"\nmatrix ops that ran in float: {', '.join(flagged)}"
        return text

    def table(self) -> str:
        total = self.total_ms() or 1.0
        rows = [
            [k.node, k.op, k.kind + (" (!)" if k.float_matrix else ""), f"{k.ms:.4f}", f"{k.ms / total * 100:.1f}",
             ",".join(k.input_types)]
            for k in self.kernels
        ]  # fmt: skip
        return format_table(["node", "kernel", "kind", "ms", "%", "input types"], rows, "lllrrl")

    def to_dict(self) -> dict:
        return {"runs": self.runs, "batch": self.batch, "kernels": [asdict(k) for k in self.kernels]}


def kernel_kind(op: str, input_types: list[str]) -> str:
    """What kernel ``op`` reading elements of ``input_types`` does: one of :data:`KINDS` (see the module's
    docstring). The op decides first (a conversion, a data movement), then the types it reads.

    >>> kernel_kind("Flatten", ["uint8"]), kernel_kind("MaxPool", ["uint8"]), kernel_kind("Gather", ["float", "int64"])
    ('move', 'integer', 'move')
    """
    if op in CONVERT:
        return "convert"
    if op in MOVE:
        return "move"
    if any(t in INTEGER_TYPES for t in input_types):
        return "integer"
    if any(t in FLOAT_TYPES for t in input_types) or not input_types:
        return "float"
    return "other"


CONTROL = {"If", "Loop", "Scan"}  # their time is that of the kernels inside them, listed themselves


def parse(events: list[dict], runs: int, batch: int, total_runs: int | None = None) -> Profile:
    """Kernels from the events of an ONNX Runtime profile, in the order they ran; each node's time is its mean time
    per run over the last ``runs`` runs (earlier ones were warm-up). With ``total_runs`` (warm-up included), a node
    inside a Loop or Scan body that ran several times per run counts all of them. If/Loop/Scan nodes themselves are
    left out: their time is the kernels' inside them."""
    times: dict[str, list[float]] = {}
    info: dict[str, tuple[str, list[str]]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        if args.get("op_name") in CONTROL:
            continue
        node = _SUFFIX.sub("", e["name"])
        types = [next(iter(t)) for t in args.get("input_type_shape", []) if isinstance(t, dict) and t]
        info.setdefault(node, (args.get("op_name", "?"), types))
        times.setdefault(node, []).append(float(e.get("dur", 0)) / 1000.0)
    kernels = []
    for node, durations in times.items():
        op, types = info[node]
        per_run = len(durations) // total_runs if total_runs and len(durations) % total_runs == 0 else 1
        last = durations[-runs * per_run :] if runs > 0 else durations
        kernels.append(Kernel(node, op, kernel_kind(op, types), float(np.sum(last) / max(len(last) // per_run, 1)),
                              types))  # fmt: skip
    return Profile(kernels, runs, batch)


def profile(
    model: onnx.ModelProto | str | Path, feed: Mapping[str, np.ndarray], runs: int = 10, warmup: int = 3
) -> Profile:
    """Run ``model`` ``warmup`` + ``runs`` times on ``feed`` under ONNX Runtime's profiler, with its graph
    optimizations on (as deployed; an FP8 model with none: :func:`lowbit.onnx.model.session_options`),
    and read what ran in the last ``runs``."""
    with tempfile.TemporaryDirectory(prefix="lowbit-profile-") as tmp:
        loaded = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
        options = session_options(loaded)  # an FP8 model with no graph optimization, as it must run
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        if isinstance(model, onnx.ModelProto):
            if is_large(model):
                save_model(model, Path(tmp) / "model.onnx")
                source = str(Path(tmp) / "model.onnx")
            else:
                source = model.SerializeToString()
        else:
            source = str(model)
        try:
            sess = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            for _ in range(warmup + runs):
                sess.run(None, dict(feed))
        except Exception as exc:
            raise load_error(exc, "check that the model and the feed fit each other") from None
        events = json.loads(Path(sess.end_profiling()).read_text())
    batch = int(next(iter(feed.values())).shape[0]) if feed else 0
    return parse(events, runs, batch, warmup + runs)


def random_feed(inputs, batch_size: int, size: tuple[int, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A feed of ``batch_size`` samples for ``inputs`` (:class:`lowbit.data.InputSpec`): standard normal floats,
    zero integers. The free dimensions of an input besides the batch are filled with ``size`` (height, width; from
    the model's metadata, :func:`lowbit.onnx.model.metadata_size`) when there are exactly two of them; otherwise
    they cannot be made up."""
    feed = {}
    rng = np.random.default_rng(seed)
    for spec in inputs:
        shape = [batch_size if i == 0 and d is None else d for i, d in enumerate(spec.shape)]
        free = [i for i, d in enumerate(shape) if d is None]
        if size is not None and len(free) == 2:
            shape[free[0]], shape[free[1]] = size
        if any(d is None for d in shape):
            raise FormatError(f"input {spec.describe()} has free dimensions besides the batch: give data to run on")
        kind = np.dtype(spec.dtype).kind
        feed[spec.name] = (rng.standard_normal(shape) if kind == "f" else np.zeros(shape)).astype(spec.dtype)
    return feed
