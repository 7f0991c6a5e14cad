"""Measure tensors of quantized ONNX models against the float model's, streamed batch by batch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import onnx
from tqdm.auto import tqdm

from lowbit.analysis import Error, ErrorMeter
from lowbit.data import Feed
from lowbit.onnx.controlflow import expose
from lowbit.onnx.model import session


def compare_tensors(
    reference: onnx.ModelProto,
    candidates: Mapping[str, tuple[onnx.ModelProto, Sequence[str]]],
    feeds: Iterable[Feed],
    *,
    total: int | None = None,
    desc: str = "comparing",
    progress: bool = True,
) -> dict[str, dict[str, Error]]:
    """Run ``reference`` and every candidate model (key -> (model, tensors)) on each feed and measure each
    candidate's named tensors against the reference's: ``{key: {tensor: Error}}``. The reference runs once per
    feed for all candidates; only one batch of values is held at a time."""
    wanted = list(dict.fromkeys(t for _, tensors in candidates.values() for t in tensors))
    ref_model, ref_names = expose(reference, wanted)  # a tensor inside an If/Loop/Scan body too
    ref = session(ref_model)
    runs = {}
    for key, (model, tensors) in candidates.items():
        exposed, names = expose(model, tensors)
        runs[key] = (session(exposed), list(tensors), [names[t] for t in tensors])
    meters = {key: {t: ErrorMeter() for t in tensors} for key, (_, tensors, _) in runs.items()}
    bar = tqdm(total=None if total is None else total * len(runs), desc=desc, unit="run", disable=not progress,
               leave=False)  # fmt: skip
    for feed in feeds:
        values = dict(zip(wanted, ref.run([ref_names[t] for t in wanted], dict(feed)), strict=True))
        for key, (sess, tensors, outputs) in runs.items():
            for t, v in zip(tensors, sess.run(outputs, dict(feed)), strict=True):
                if v.size or values[t].size:  # an If branch that did not run hands out nothing
                    meters[key][t].update(values[t], v)
            bar.update(1)
    bar.close()
    return {key: {t: m.result() for t, m in ms.items()} for key, ms in meters.items()}
