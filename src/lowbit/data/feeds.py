"""What a model is fed: its inputs (:class:`InputSpec`), a feed (input name -> array), a re-iterable source of
feeds checked against the inputs (:class:`FeedSource`), and the checks every source goes through (shape, dtype,
NaN/Inf)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from lowbit.errors import DataWarning, LowbitError


class DataError(LowbitError, ValueError):
    """Calibration data that cannot be read or does not fit."""


@dataclass(frozen=True)
class Batches:
    """A re-iterable stream of batches with a known length: every ``iter()`` starts from the first batch."""

    make: Callable[[], Iterator[np.ndarray]]
    length: int

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.make()

    def __len__(self) -> int:
        return self.length


class InputSpec(NamedTuple):
    """One model input: its name, dtype, and shape (``None`` for a free dimension such as the batch)."""

    name: str
    dtype: np.dtype
    shape: tuple

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {np.dtype(self.dtype).name}[{dims}]"


Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class FeedSource:
    """Samples for a model, as a re-iterable stream of feed dicts whose arrays share a first (sample) axis.

    ``read()`` yields feed dicts of any size as they come; :meth:`chunks` yields them checked against the model's
    inputs (:func:`check_feed`) and for NaN/Inf (:func:`check_finite`); :meth:`batches` re-cuts those into
    batches of a fixed size.
    """

    read: Callable[[], Iterator[Any]]
    num_samples: int | None
    description: str
    inputs: tuple[InputSpec, ...]
    # Array names already warned about as used for an input of another name: one warning per source, not per chunk.
    renamed: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Batches:
        """Feed dicts of ``batch_size`` samples (the last may be shorter) for samples ``start`` .. ``stop``."""
        end = self.num_samples if stop is None else stop if self.num_samples is None else min(stop, self.num_samples)
        length = 0 if end is None else max(0, -(-(end - start) // batch_size))
        return Batches(lambda: self._cut(batch_size, start, end), length)

    def chunks(self) -> Iterator[Feed]:
        """The feed dicts ``read()`` yields, each checked: one that does not fit the model or holds NaN/Inf is a
        :class:`DataError` naming the data, the input and the first bad sample (counting from 0)."""
        position = 0
        for chunk in self.read():
            chunk = check_feed(chunk, self.inputs, self.description, renamed=self.renamed)
            check_finite(chunk, self.description, position)
            position += samples_in(chunk, whole_chunk(self.inputs))
            yield chunk

    def _cut(self, batch_size: int, start: int, stop: int | None) -> Iterator[Feed]:
        whole = whole_chunk(self.inputs)
        # An input with a batch axis of its own (a recurrent state (layers, batch, hidden)) cannot be cut or joined
        # by sample: each chunk is then one batch.
        apart = any(s.shape for s in self.inputs if s.name in whole)
        position = 0
        pending: list[Feed] = []
        held = 0
        for chunk in self.chunks():
            n = samples_in(chunk, whole)
            lo, hi = max(start - position, 0), n if stop is None else min(n, stop - position)
            position += n
            if hi <= lo:
                if stop is not None and position >= stop:
                    break
                continue
            part = {k: v if k in whole else v[lo:hi] for k, v in chunk.items()}
            if pending and (apart or not _same_values(pending[-1], part, whole)):  # never mix two flag values
                yield _take(pending, held, whole)[0]
                pending, held = [], 0
            pending.append(part)
            held += hi - lo
            while held >= batch_size and not apart:
                batch, pending, held = _take(pending, batch_size, whole)
                yield batch
            if stop is not None and position >= stop:
                break
        if held:
            yield _take(pending, held, whole)[0]


def whole_chunk(inputs: Sequence[InputSpec]) -> frozenset[str]:
    """The inputs a chunk of samples carries whole instead of one row per sample: a scalar (a flag or a sample
    rate for the whole batch, such as the input an If chooses its branch by) and, when another input has a free
    batch axis, an input whose first axis the model fixes (a recurrent state laid out (layers, batch, hidden))."""
    free = any(s.shape and s.shape[0] is None for s in inputs)
    return frozenset(s.name for s in inputs if not s.shape or (free and s.shape[0] is not None))


def samples_in(feed: Feed, whole: Collection[str] = ()) -> int:
    """The number of samples a feed holds: the first axis of its arrays (those in ``whole`` and scalars aside; a
    feed of those alone holds one)."""
    return next((np.shape(v)[0] for k, v in feed.items() if k not in whole and np.ndim(v)), 1)


def _same_values(a: Feed, b: Feed, whole: Collection[str]) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a if k in whole or not np.ndim(a[k]))


def _take(pending: list[Feed], n: int, whole: Collection[str] = ()) -> tuple[Feed, list[Feed], int]:
    """The first ``n`` samples of ``pending`` as one feed, and what is left (inputs in ``whole`` go along)."""
    parts: list[Feed] = []
    got = 0
    while got < n:
        head = pending[0]
        k = min(n - got, samples_in(head, whole))
        parts.append({name: v if name in whole or not np.ndim(v) else v[:k] for name, v in head.items()})
        got += k
        if k == samples_in(head, whole):
            pending = pending[1:]
        else:
            pending = [{name: v if name in whole or not np.ndim(v) else v[k:] for name, v in head.items()},
                       *pending[1:]]  # fmt: skip
    batch = (
        parts[0]
        if len(parts) == 1
        else {
            name: v if name in whole or not np.ndim(v) else np.concatenate([p[name] for p in parts])
            for name, v in parts[0].items()
        }
    )
    return batch, pending, sum(samples_in(p, whole) for p in pending)


def describe_inputs(inputs: Sequence[InputSpec]) -> str:
    """The inputs as a message lists them."""
    return "; ".join(i.describe() for i in inputs)


def check_feed(feed: Any, inputs: Sequence[InputSpec], where: str, *, renamed: set[str] | None = None) -> Feed:
    """``feed`` as a dict of arrays that fit ``inputs``, or a :class:`DataError` that lists what the model expects.

    One array and a one-input model need not agree on the name: a named array used for an input of another name
    gives a :class:`~lowbit.errors.DataWarning`, once per name in ``renamed`` (the names warned about so far).
    Arrays must already have the model's dtype.
    """
    if not isinstance(feed, Mapping):
        if len(inputs) == 1 and isinstance(feed, np.ndarray):
            feed = {inputs[0].name: feed}
        else:
            raise DataError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
    feed = {str(k): np.asarray(v) for k, v in feed.items()}
    names = [i.name for i in inputs]
    if len(inputs) == 1 and len(feed) == 1 and names[0] not in feed:
        (given,) = feed
        if renamed is None or given not in renamed:
            warnings.warn(
                f"{where}: using the array {given!r} for the model's only input {names[0]!r}; "
                f"name the array {names[0]!r} to silence this",
                DataWarning,
                stacklevel=2,
            )
            if renamed is not None:
                renamed.add(given)
        feed = {names[0]: feed[given]}
    missing = [n for n in names if n not in feed]
    extra = [n for n in feed if n not in names]
    if missing or extra:
        raise DataError(
            f"{where}: the data has arrays {sorted(feed)} but the model's inputs are {describe_inputs(inputs)}"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (unknown: {', '.join(extra)})" if extra else "")
        )
    sizes = set()
    whole = whole_chunk(inputs)
    for spec in inputs:
        value = feed[spec.name]
        _check_dtype(value, spec, where)
        if value.ndim != len(spec.shape):
            raise DataError(
                f"{where}: input {spec.name!r} has shape {value.shape} (rank {value.ndim}) but the model expects "
                f"rank {len(spec.shape)}: {spec.describe()}; the first axis is the sample axis"
            )
        for axis, (got, want) in enumerate(zip(value.shape, spec.shape, strict=True)):
            if (axis > 0 or spec.name in whole) and want is not None and got != want:
                raise DataError(
                    f"{where}: input {spec.name!r} has shape {value.shape} but the model expects "
                    f"{spec.describe()} (axis {axis} differs)"
                )
        if spec.name not in whole:
            sizes.add(value.shape[0])
    if len(sizes) > 1:
        raise DataError(f"{where}: the inputs have different numbers of samples {sorted(sizes)}")
    return feed


# What an array of a dtype kind holds, for kinds no cast makes into the numbers a model wants.
_NOT_NUMBERS = {
    "U": "strings",
    "S": "bytes",
    "O": "Python objects",
    "V": "records",
    "M": "dates",
    "m": "time spans",
    "c": "complex numbers",
    "b": "booleans",
}


def _check_dtype(value: np.ndarray, spec: InputSpec, where: str) -> None:
    want = np.dtype(spec.dtype)
    if value.dtype == want:
        return
    holds = _NOT_NUMBERS.get(value.dtype.kind)
    if holds is not None and value.dtype.kind != want.kind:
        raise DataError(
            f"{where}: input {spec.name!r} holds {holds} (dtype {value.dtype}) but the model expects "
            f"{want.name} ({spec.describe()}); give it an array of {want.name} numbers"
        )
    raise DataError(
        f"{where}: input {spec.name!r} is {value.dtype} but the model expects {want.name} "
        f"({spec.describe()}); convert it, e.g. array.astype(np.{want.name})"
    )


def check_finite(feed: Feed, where: str, first_sample: int = 0) -> None:
    """A :class:`DataError` if a float array of ``feed`` holds NaN or Inf: it names the input, the first bad
    sample (``first_sample`` is the index of the feed's sample 0 in the data) and the counts of each."""
    for name, value in feed.items():
        if value.dtype.kind not in "fc" or value.size == 0:
            continue
        finite = np.isfinite(value)
        if finite.all():
            continue
        nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
        n = len(value) if value.ndim else 1
        bad = int((~finite.reshape(n, -1).all(axis=1)).argmax())
        raise DataError(
            f"{where}: input {name!r} has NaN/Inf values, the first in sample {first_sample + bad} (counting from 0); "
            f"samples {first_sample}-{first_sample + n - 1} hold {nan} NaN and {inf} Inf values; "
            "fix or drop the samples with them"
        )
