"""Cut one layer out of a model, float and quantized, with inputs recorded from the calibration data.

For a layer ``conv7`` this writes, into a folder:
- ``conv7.float.onnx``: the layer (and a Relu/Clip right after it) as in the float model;
- ``conv7.int8.onnx``: the same cut of the quantized model, with its QuantizeLinear/DequantizeLinear;
- ``conv7.inputs.npz``: the float values the layer's inputs took on the analysis samples (feed either model);
- ``conv7.fp32_output.npy``: what the float layer computed from them.
Both models take the same input names, so ``session.run(None, dict(np.load("conv7.inputs.npz")))`` runs either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx.utils import Extractor

from lowbit._io import atomic_open
from lowbit.data import Feed
from lowbit.errors import AnalyzeError
from lowbit.onnx.calibration import Built, Calibrated
from lowbit.onnx.collect import with_outputs
from lowbit.onnx.model import save_model, session
from lowbit.onnx.rules import unit_output

MAX_RECORDED = 64  # samples of recorded inputs


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "node"


def cut(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from ``inputs`` (a model of its own, same opsets)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    for name in [*inputs, *outputs]:
        if name not in known:  # the Extractor needs a type for every boundary tensor
            inferred.graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sub = Extractor(inferred).extract_model(inputs, outputs)
    del sub.opset_import[:]
    sub.opset_import.extend(model.opset_import)
    return sub


def _rename(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    g = model.graph
    for node in g.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for info in [*g.input, *g.output, *g.value_info]:
        info.name = mapping.get(info.name, info.name)


def extract(calibrated: Calibrated, built: Built, name: str, feeds: Iterable[Feed], folder: str | Path) -> list[Path]:
    """Write the float and quantized cut of layer ``name`` and its recorded inputs into ``folder`` (see the
    module doc); returns the paths written."""
    graph = calibrated.graph
    node = next((n for n in graph.nodes if graph.node_name(n) == name), None)
    if node is None:
        known = ", ".join(graph.node_name(n) for n in graph.nodes[:40])
        raise AnalyzeError(f"--extract {name!r}: no node of that name; nodes include: {known}")
    inputs = [t for t in dict.fromkeys(node.input) if graph.is_activation(t)]
    if not inputs:
        raise AnalyzeError(f"--extract {name!r}: the node reads no computed tensor")
    output = unit_output(graph, name)
    float_sub = cut(calibrated.float_model, inputs, [output])

    q = built.model
    produced = {o for n in q.graph.node for o in n.output}
    q_inputs, mapping = [], {}
    for t in inputs:
        if t in graph.inputs or f"{t}_float" not in produced:
            q_inputs.append(t)
        else:  # the quantized model calls the float value t_float and its dequantized copy t
            q_inputs.append(f"{t}_float")
            mapping[f"{t}_float"], mapping[t] = t, f"{t}_dequantized"
    q_sub = cut(q, q_inputs, [output])
    _rename(q_sub, mapping)

    recorded: dict[str, list[np.ndarray]] = {t: [] for t in [*inputs, output]}
    names = list(recorded)
    wanted = [t for t in names if t not in graph.inputs]
    sess = session(with_outputs(calibrated.float_model, wanted))
    seen = 0
    for feed in feeds:
        values = dict(zip(wanted, sess.run(wanted, dict(feed)), strict=True))
        for t in names:
            recorded[t].append(np.asarray(feed[t]) if t in graph.inputs else values[t])
        seen += len(recorded[names[0]][-1])
        if seen >= MAX_RECORDED:
            break
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / _safe(name)
    paths = [base.with_name(base.name + s) for s in (".float.onnx", ".int8.onnx", ".inputs.npz", ".fp32_output.npy")]
    save_model(float_sub, paths[0])
    save_model(q_sub, paths[1])
    with atomic_open(paths[2], "wb") as f:
        np.savez(f, **{t: np.concatenate(recorded[t])[:MAX_RECORDED] for t in inputs})
    with atomic_open(paths[3], "wb") as f:
        np.save(f, np.concatenate(recorded[output])[:MAX_RECORDED])
    return paths
