"""Float vs quantized, side by side: output agreement on held-out samples and latency on ONNX Runtime CPU."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort

from lowbit.analysis import cosine_rows
from lowbit.data import Feed, InputSpec


@dataclass(frozen=True)
class Agreement:
    """How closely the quantized model's first output follows the float model's, over ``samples`` samples.

    ``cosine``: mean over samples of the cosine similarity of the flattened outputs; ``max_abs_error``: the
    largest absolute difference; ``top1``: fraction of samples whose argmax agrees (classifier outputs, else None).
    """

    samples: int
    cosine: float
    max_abs_error: float
    top1: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(
    reference: ort.InferenceSession, candidate: ort.InferenceSession, feeds: Iterable[Feed]
) -> Agreement | None:
    """Compare the first outputs of two sessions over ``feeds``; None when there were no samples."""
    name = reference.get_outputs()[0].name
    cosines: list[np.ndarray] = []
    max_err, agree, n, classifier = 0.0, 0, 0, True
    for feed in feeds:
        a = reference.run([name], dict(feed))[0]
        b = candidate.run([name], dict(feed))[0]
        if a.dtype.kind != "f" or a.ndim == 0:
            return None
        cosines.append(cosine_rows(a, b))
        max_err = max(max_err, float(np.abs(a.astype(np.float64) - b).max(initial=0.0)))
        classifier = classifier and a.ndim == 2 and a.shape[1] > 1
        if classifier:
            agree += int((a.argmax(axis=1) == b.argmax(axis=1)).sum())
        n += a.shape[0]
    if n == 0:
        return None
    return Agreement(n, float(np.concatenate(cosines).mean()), max_err, agree / n if classifier else None)


def batch_of(sample: Feed, inputs: tuple[InputSpec, ...], batch: int) -> Feed | None:
    """``sample`` repeated or cut to ``batch`` samples; None when an input's batch dimension is fixed otherwise."""
    out = {}
    for spec in inputs:
        fixed = spec.shape[0] if spec.shape else None
        if fixed is not None and fixed != batch:
            return None
        x = sample[spec.name]
        reps = -(-batch // x.shape[0])
        out[spec.name] = np.concatenate([x] * reps)[:batch] if reps > 1 else x[:batch]
    return out


def interleaved_latency_ms(
    sessions: Mapping[str, ort.InferenceSession],
    feed: Feed,
    *,
    warmup: int = 3,
    settle_s: float = 0.2,
    runs: int = 5,
    timed_s: float = 0.05,
    budget_s: float = 2.0,
    rounds: int = 3,
) -> dict[str, float]:
    """Median wall time (ms) of each session on ``feed``, measured in rounds that run every session once, in an
    order rotated each round: a machine that slows down or speeds up mid-measurement (turbo, a neighbour's load,
    caches) shifts every model alike instead of the ones measured at that moment.

    In a round each session first runs untimed for ``settle_s`` (at least once), then timed: ``runs`` runs, and
    more while ``timed_s`` lasts (a small model gets many samples for the same settling). The
    worker threads of ONNX Runtime's other sessions go on spinning, and sharing the cores, for tens of
    milliseconds after their last run: on 2 cores, EfficientNet-Lite0 timed right after another model ran up to
    2x slower at batch 8 and 2.7x at batch 1 than alone, while after 0.2 s of its own runs it times as alone.
    At least ``rounds`` rounds, more while ``budget_s`` lasts (up to 50)."""
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    r = 0
    while r < rounds or (time.perf_counter() - start < budget_s and r < 50):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            settled = time.perf_counter() + settle_s
            sessions[name].run(None, feed)
            while time.perf_counter() < settled:
                sessions[name].run(None, feed)
            timed_until = time.perf_counter() + timed_s
            for i in itertools.count():
                if i >= runs and time.perf_counter() >= timed_until:
                    break
                t0 = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append(time.perf_counter() - t0)
        r += 1
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}


def latencies(
    sessions: Mapping[str, ort.InferenceSession],
    sample: Feed,
    inputs: tuple[InputSpec, ...],
    batches: Iterable[int] = (1, 8),
) -> dict[str, dict[int, float | None]]:
    """``{name: {batch: median ms}}`` for each session; None where the model's batch size is fixed otherwise."""
    out: dict[str, dict[int, float | None]] = {name: {} for name in sessions}
    for b in batches:
        feed = batch_of(sample, inputs, b)
        times = interleaved_latency_ms(sessions, feed, budget_s=0.0) if feed is not None else {}
        for name in sessions:
            out[name][b] = times.get(name)
    return out
