"""Float vs quantized, side by side: output agreement on held-out samples and latency on ONNX Runtime CPU."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sized
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from lowbit.analysis import MAX_SQNR_DB, cosine_rows, finite_rows
from lowbit.data import Feed, InputSpec, samples_in, whole_chunk


@dataclass(frozen=True)
class Agreement:
    """How closely the quantized model's first output follows the float model's, over ``samples`` samples.

    A sample whose output holds a NaN or an infinity, in either model, is counted in ``nonfinite`` and left out
    of every figure (``nonfinite_reference``: of those, the ones whose float output is not finite either, as when
    the input itself holds a NaN). Over the ``finite`` rest: ``cosine``, the mean over samples of the cosine
    similarity of the flattened outputs; ``max_abs_error``, the largest absolute difference; ``top1``, the
    fraction of samples whose argmax agrees (classifier outputs, else None); ``sqnr_db``, the signal-to-noise ratio
    of the whole output, ``10 log10(sum a^2 / sum (a - b)^2)``, which sees the error of an output with one value
    per sample (where a cosine is always 1). With no finite sample, these are None: an argmax or a maximum over NaN
    means nothing. ``channel_cosines``: the cosine of each channel (axis 1) of the output over every sample and
    position, so that a block of scores that collapsed shows even when larger values (box coordinates) dominate
    the whole output's cosine; empty for outputs without channels.
    """

    samples: int
    cosine: float | None
    max_abs_error: float | None
    top1: float | None
    nonfinite: int = 0
    nonfinite_reference: int = 0
    sqnr_db: float | None = None
    channel_cosines: tuple[float, ...] = ()

    @property
    def worst_channel(self) -> tuple[int, float] | None:
        """(index, cosine) of the channel that agrees least, or None without channels."""
        if not self.channel_cosines:
            return None
        i = int(np.argmin(self.channel_cosines))
        return i, self.channel_cosines[i]

    @property
    def collapsed(self) -> bool:
        """Whether the worst channel is far below the whole output: its gap to 1 over 10x the whole output's and its
        cosine under 0.99 (a block of outputs that quantization broke, which the whole output's cosine hides)."""
        worst = self.worst_channel
        if worst is None or self.cosine is None:
            return False
        return worst[1] < 0.99 and 1 - worst[1] > 10 * max(1 - self.cosine, 1e-6)

    @property
    def finite(self) -> int:
        """The samples the figures are computed over."""
        return self.samples - self.nonfinite

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    feeds: Iterable[Feed],
    *,
    total: int | None = None,
    progress: bool = True,
) -> Agreement | None:
    """Compare the first outputs of two sessions over ``feeds``; None when there were no samples (or the output
    is not a float tensor with a sample axis). ``total``: the number of feeds for the progress bar (default:
    ``len(feeds)`` when it has one)."""
    name = reference.get_outputs()[0].name
    if total is None and isinstance(feeds, Sized):
        total = len(feeds) or None
    cosines: list[np.ndarray] = []
    channels = _Channels()
    max_err, agree, n, classifier = 0.0, 0, 0, True
    nonfinite = nonfinite_reference = 0
    with tqdm(feeds, total=total, desc="comparing FP32 and quantized", unit="batch", disable=not progress,
              leave=False) as bar:  # fmt: skip
        for feed in bar:
            a = reference.run([name], dict(feed))[0]
            b = candidate.run([name], dict(feed))[0]
            if a.dtype.kind != "f" or a.ndim == 0:
                return None
            n += a.shape[0]
            classifier = classifier and a.ndim == 2 and a.shape[1] > 1
            ok_a = finite_rows(a)
            ok = ok_a & finite_rows(b)
            nonfinite += int((~ok).sum())
            nonfinite_reference += int((~ok_a).sum())
            a, b = a[ok], b[ok]
            if not len(a):
                continue
            cosines.append(cosine_rows(a, b))
            channels.update(a, b)
            max_err = max(max_err, float(np.abs(a.astype(np.float64) - b).max(initial=0.0)))
            if classifier:
                agree += int((a.argmax(axis=1) == b.argmax(axis=1)).sum())
    if n == 0:
        return None
    finite = n - nonfinite
    if finite == 0:
        return Agreement(n, None, None, None, nonfinite, nonfinite_reference)
    top1 = agree / finite if classifier else None
    return Agreement(n, float(np.concatenate(cosines).mean()), max_err, top1, nonfinite, nonfinite_reference,
                     channels.sqnr_db(), channels.cosines())  # fmt: skip


class _Channels:
    """Per-channel (axis 1) dot products and energies of two outputs, and their totals, summed over batches."""

    def __init__(self):
        self.dot = self.aa = self.bb = None
        self.signal = self.noise = 0.0

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = a.astype(np.float64), b.astype(np.float64)
        self.signal += float((a * a).sum())
        self.noise += float(((a - b) ** 2).sum())
        if a.ndim < 2 or a.shape[1] < 2:
            return
        axes = (0, *range(2, a.ndim))
        dot, aa, bb = (a * b).sum(axis=axes), (a * a).sum(axis=axes), (b * b).sum(axis=axes)
        if self.dot is None:
            self.dot, self.aa, self.bb = dot, aa, bb
        else:
            self.dot, self.aa, self.bb = self.dot + dot, self.aa + aa, self.bb + bb

    def cosines(self) -> tuple[float, ...]:
        if self.dot is None:
            return ()
        norm = np.sqrt(self.aa * self.bb)
        both_zero = (self.aa == 0) & (self.bb == 0)
        cos = np.where(norm > 0, self.dot / np.where(norm > 0, norm, 1), np.where(both_zero, 1.0, 0.0))
        return tuple(float(c) for c in cos)

    def sqnr_db(self) -> float | None:
        if self.signal == 0 and self.noise == 0:
            return None
        return MAX_SQNR_DB if self.noise == 0 else 10 * float(np.log10(max(self.signal, 1e-300) / self.noise))


def batch_of(sample: Feed, inputs: tuple[InputSpec, ...], batch: int) -> Feed | None:
    """``sample`` repeated or cut to ``batch`` samples; None when an input's batch dimension is fixed otherwise."""
    out = {}
    whole = whole_chunk(inputs)
    if any(s.shape for s in inputs if s.name in whole) and samples_in(sample, whole) != batch:
        return None  # an input with its own batch axis (a recurrent state) cannot be repeated to another batch
    for spec in inputs:
        if spec.name in whole:
            out[spec.name] = sample[spec.name]
            continue
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


def untimed(inputs: tuple[InputSpec, ...], batches: Iterable[int] = (1, 8)) -> dict[int, str]:
    """Why :func:`latencies` leaves each of ``batches`` untimed (None), for the batch sizes it does: an input whose
    first dimension is fixed at another size. ``{8: "the model's batch size is fixed at 1"}``."""
    out = {}
    for b in batches:
        fixed = sorted({s.shape[0] for s in inputs if s.shape and s.shape[0] is not None and s.shape[0] != b})
        if fixed:
            out[b] = f"the model's batch size is fixed at {', '.join(map(str, fixed))}"
    return out


def latencies(
    sessions: Mapping[str, ort.InferenceSession],
    sample: Feed,
    inputs: tuple[InputSpec, ...],
    batches: Iterable[int] = (1, 8),
    *,
    progress: bool = True,
) -> dict[str, dict[int, float | None]]:
    """``{name: {batch: median ms}}`` for each session; None where the model's batch size is fixed otherwise
    (:func:`untimed` says so in words)."""
    batches = list(batches)
    out: dict[str, dict[int, float | None]] = {name: {} for name in sessions}
    with tqdm(total=len(batches) * len(sessions), desc="timing latency", unit="model", disable=not progress,
              leave=False) as bar:  # fmt: skip
        for b in batches:
            bar.set_postfix_str(f"batch {b}")
            feed = batch_of(sample, inputs, b)
            times = interleaved_latency_ms(sessions, feed, budget_s=0.0) if feed is not None else {}
            for name in sessions:
                out[name][b] = times.get(name)
            bar.update(len(sessions))
    return out
