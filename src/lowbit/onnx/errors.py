"""How far a quantized tensor is from its float value: SQNR, cosine similarity and max error, streamed."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort
from tqdm.auto import tqdm

from lowbit.data import Feed
from lowbit.onnx.calibrate import with_outputs
from lowbit.onnx.compare import _cosine
from lowbit.onnx.model import session

MAX_SQNR_DB = 300.0  # what an exact match reports (JSON has no infinity)


@dataclass(frozen=True)
class Error:
    """``sqnr_db``: 10 log10(signal power / error power) over every element (higher is better); ``cosine``: mean
    over samples of the cosine similarity of the flattened tensors; ``max_abs_error``: the largest difference."""

    sqnr_db: float
    cosine: float
    max_abs_error: float

    def to_dict(self) -> dict:
        return asdict(self)


class ErrorMeter:
    """Accumulates :class:`Error` batch by batch: nothing but sums is kept."""

    def __init__(self):
        self.signal = self.noise = self.cos_sum = 0.0
        self.samples = 0
        self.max_abs = 0.0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        a = np.asarray(reference, np.float64)
        b = np.asarray(candidate, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
        if a.ndim == 0:
            a, b = a.reshape(1, 1), b.reshape(1, 1)
        d = a - b
        self.signal += float((a * a).sum())
        self.noise += float((d * d).sum())
        self.max_abs = max(self.max_abs, float(np.abs(d).max(initial=0.0)))
        self.cos_sum += float(_cosine(a, b).sum())
        self.samples += a.shape[0]

    def result(self) -> Error:
        if self.noise <= 0:
            sqnr = MAX_SQNR_DB
        elif self.signal <= 0:
            sqnr = -MAX_SQNR_DB
        else:
            sqnr = min(MAX_SQNR_DB, 10 * math.log10(self.signal / self.noise))
        return Error(sqnr, self.cos_sum / max(self.samples, 1), self.max_abs)


def compare_tensors(
    reference: onnx.ModelProto,
    candidates: Mapping[str, tuple[onnx.ModelProto, Sequence[str]]],
    feeds: Iterable[Feed],
    *,
    total: int | None = None,
    desc: str = "comparing",
    progress: bool = True,
    sessions: Mapping[str, ort.InferenceSession] | None = None,
) -> dict[str, dict[str, Error]]:
    """Run ``reference`` and every candidate model (key -> (model, tensors)) on each feed and measure each
    candidate's named tensors against the reference's: ``{key: {tensor: Error}}``. The reference runs once per
    feed for all candidates; only one batch of values is held at a time."""
    wanted = list(dict.fromkeys(t for _, tensors in candidates.values() for t in tensors))
    ref = session(with_outputs(reference, wanted))
    runs = {}
    for key, (model, tensors) in candidates.items():
        sess = (sessions or {}).get(key) or session(with_outputs(model, tensors))
        runs[key] = (sess, list(tensors))
    meters = {key: {t: ErrorMeter() for t in tensors} for key, (_, tensors) in runs.items()}
    bar = tqdm(total=None if total is None else total * len(runs), desc=desc, unit="run", disable=not progress,
               leave=False)  # fmt: skip
    for feed in feeds:
        values = dict(zip(wanted, ref.run(wanted, dict(feed)), strict=True))
        for key, (sess, tensors) in runs.items():
            for t, v in zip(tensors, sess.run(tensors, dict(feed)), strict=True):
                meters[key][t].update(values[t], v)
            bar.update(1)
    bar.close()
    return {key: {t: m.result() for t, m in ms.items()} for key, ms in meters.items()}
