"""Which samples calibrate and which are held out to compare the float and the quantized model.

Calibration files are often ordered (one class after another, speech first and silence last), so neither set is
a prefix: when the source's length is known, the held-out samples and, past ``max_samples``, the calibration
samples are a seeded random spread over the whole source, read in file order in one streaming pass. A source of
unknown length (a Python function, an iterator) can only be read in order: the first ``max_samples`` samples
calibrate and the next ones are held out, and the split says so.

>>> import numpy as np
>>> from lowbit.data import InputSpec, open_feeds
>>> source = open_feeds({"x": np.arange(100, dtype=np.float32)[:, None]}, [InputSpec("x", np.float32, (None, 1))])
>>> s = split(source, max_samples=50, holdout=10)
>>> s.calib.num_samples, s.held.num_samples
(50, 10)
>>> print(s.describe())
calibration on 50 of 100 samples, 10 others held out for the comparison (a seeded spread over the data)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from lowbit.data import Feed, FeedSource, samples_in, whole_chunk

SEED = 0


@dataclass(frozen=True)
class Split:
    """``calib`` and ``held`` (None when nothing is held out) drawn from one source of ``total`` samples (None:
    unknown); ``spread`` tells whether they were drawn across the whole source or read in order."""

    calib: FeedSource
    held: FeedSource | None
    total: int | None
    spread: bool
    bound: int

    def describe(self) -> str:
        """One line: how many samples calibrate, how many are held out, and how they were chosen."""
        if self.total is None:
            text = f"calibration on the first {self.bound} samples at most"
            held = "the next ones held out for the comparison" if self.held is not None else ""
            return ", ".join(filter(None, [text, held])) + " (in order: the data's length is unknown)"
        text = f"calibration on {self.calib.num_samples} of {self.total} samples"
        if self.held is not None:
            text += f", {self.held.num_samples} others held out for the comparison"
        return text + (" (a seeded spread over the data)" if self.spread else "")


def split(source: FeedSource, max_samples: int, holdout: int = 0, seed: int = SEED) -> Split:
    """Calibration samples (at most ``max_samples``) and up to ``holdout`` held-out samples from ``source``.

    With a known length ``n``, ``min(holdout, n // 5)`` samples are held out (a fifth at most, so calibration keeps
    most of a small set), both drawn by a generator seeded with ``seed``; else the first ``max_samples`` calibrate
    and the next ``holdout`` are held out."""
    n = source.num_samples
    if n is None:
        calib = window(source, 0, max_samples)
        held = window(source, max_samples, max_samples + holdout) if holdout else None
        return Split(calib, held, None, spread=False, bound=max_samples)
    rng = np.random.default_rng(seed)
    h = min(holdout, n // 5)
    order = rng.permutation(n)
    held_idx, rest = np.sort(order[:h]), order[h:]
    calib_idx = np.sort(rest[:max_samples]) if len(rest) > max_samples else np.sort(rest)
    held = subset(source, held_idx) if h else None
    return Split(subset(source, calib_idx), held, n, spread=h > 0 or len(rest) > max_samples, bound=max_samples)


def subset(source: FeedSource, indices: np.ndarray) -> FeedSource:
    """The samples of ``source`` at the sorted ``indices``, in order, read in one pass."""
    indices = np.asarray(indices, dtype=np.int64)
    stop = int(indices[-1]) + 1 if len(indices) else 0

    def pick(first: int, n: int) -> np.ndarray:
        lo, hi = np.searchsorted(indices, [first, first + n])
        return indices[lo:hi] - first

    return _derived(source, pick, stop, len(indices))


def window(source: FeedSource, start: int, stop: int) -> FeedSource:
    """Samples ``start`` .. ``stop`` of ``source`` (fewer if it ends first)."""

    def pick(first: int, n: int) -> np.ndarray:
        return np.arange(max(start - first, 0), min(stop - first, n))

    total = None if source.num_samples is None else max(0, min(stop, source.num_samples) - start)
    return _derived(source, pick, stop, total)


def _derived(source: FeedSource, pick: Callable[[int, int], np.ndarray], stop: int, count: int | None) -> FeedSource:
    whole = whole_chunk(source.inputs)

    def chunks() -> Iterator[Feed]:
        position = 0
        for chunk in source.chunks():  # checked there, against the model and for NaN/Inf, at their true positions
            if position >= stop:
                break
            n = samples_in(chunk, whole)
            rows = pick(position, n)
            position += n
            if len(rows):
                yield {name: value if name in whole else value[rows] for name, value in chunk.items()}

    return FeedSource(chunks, count, source.description, source.inputs)
