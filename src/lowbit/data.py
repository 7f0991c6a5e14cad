"""Calibration data sources.

Named tensors saved as NumPy files, streamed in batches along their first axis without loading a whole file into
memory (.npy files are memory-mapped); and feeds for a model: batches of its named inputs from arrays, image
folders or a Python function, each checked against what the model expects.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lowbit.errors import DataWarning, LowbitError


@dataclass(frozen=True)
class Batches:
    """A re-iterable stream of batches with a known length: every ``iter()`` starts from the first batch."""

    make: Callable[[], Iterator[np.ndarray]]
    length: int

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.make()

    def __len__(self) -> int:
        return self.length


class DataError(LowbitError, ValueError):
    """Calibration data that cannot be read or does not fit."""


def _num_batches(shape: tuple[int, ...], batch_size: int) -> int:
    return 1 if not shape else -(-shape[0] // batch_size)


def _batches_of(array: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    if array.ndim == 0:
        yield np.asarray(array)[None]
        return
    for start in range(0, array.shape[0], batch_size):
        yield np.asarray(array[start : start + batch_size])


def _npy_source(path: Path, batch_size: int) -> Batches:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path} is not a readable .npy file: {exc}") from None
    return Batches(lambda: _batches_of(array, batch_size), _num_batches(array.shape, batch_size))


def _npz_sources(path: Path, batch_size: int) -> dict[str, Batches]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            shapes = {name: archive[name].shape for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from None

    def source(name: str) -> Batches:
        def batches() -> Iterator[np.ndarray]:
            with np.load(path, allow_pickle=False) as archive:
                yield from _batches_of(archive[name], batch_size)

        return Batches(batches, _num_batches(shapes[name], batch_size))

    return {name: source(name) for name in shapes}


def tensor_batches(path: str | os.PathLike, batch_size: int = 32) -> dict[str, Batches]:
    """Named tensors from ``path``, each a re-iterable :class:`Batches` stream.

    ``path`` is a .npz (one array per tensor, keyed by name), a .npy (one tensor named after the file) or a folder
    of .npy files. The first axis of each array is the sample axis.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size (--batch-size) must be a positive integer, got {batch_size!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; pass a .npz file, a .npy file, or a folder of .npy files")
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise DataError(f"{path} holds no .npy files")
        return {f.stem: _npy_source(f, batch_size) for f in files}
    if path.suffix == ".npz":
        sources = _npz_sources(path, batch_size)
        if not sources:
            raise DataError(f"{path} holds no arrays")
        return sources
    if path.suffix == ".npy":
        return {path.stem: _npy_source(path, batch_size)}
    raise DataError(f"{path}: expected a .npz file, a .npy file, or a folder of .npy files")


# -- feeds: batches of named model inputs -------------------------------------------------------------------------


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
            position += _samples(chunk)
            yield chunk

    def _cut(self, batch_size: int, start: int, stop: int | None) -> Iterator[Feed]:
        position = 0
        pending: list[Feed] = []
        held = 0
        for chunk in self.chunks():
            n = _samples(chunk)
            lo, hi = max(start - position, 0), n if stop is None else min(n, stop - position)
            position += n
            if hi <= lo:
                if stop is not None and position >= stop:
                    break
                continue
            pending.append({k: v[lo:hi] for k, v in chunk.items()})
            held += hi - lo
            while held >= batch_size:
                batch, pending, held = _take(pending, batch_size)
                yield batch
            if stop is not None and position >= stop:
                break
        if held:
            yield _take(pending, held)[0]


def _samples(feed: Feed) -> int:
    return next(iter(feed.values())).shape[0]


def _take(pending: list[Feed], n: int) -> tuple[Feed, list[Feed], int]:
    """The first ``n`` samples of ``pending`` as one feed, and what is left."""
    parts: list[Feed] = []
    got = 0
    while got < n:
        head = pending[0]
        k = min(n - got, _samples(head))
        parts.append({name: v[:k] for name, v in head.items()})
        got += k
        if k == _samples(head):
            pending = pending[1:]
        else:
            pending = [{name: v[k:] for name, v in head.items()}, *pending[1:]]
    batch = parts[0] if len(parts) == 1 else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return batch, pending, sum(_samples(p) for p in pending)


def _expected(inputs: Sequence[InputSpec]) -> str:
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
            f"{where}: the data has arrays {sorted(feed)} but the model's inputs are {_expected(inputs)}"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (unknown: {', '.join(extra)})" if extra else "")
        )
    sizes = set()
    for spec in inputs:
        value = feed[spec.name]
        _check_dtype(value, spec, where)
        if value.ndim != len(spec.shape):
            raise DataError(
                f"{where}: input {spec.name!r} has shape {value.shape} (rank {value.ndim}) but the model expects "
                f"rank {len(spec.shape)}: {spec.describe()}; the first axis is the sample axis"
            )
        for axis, (got, want) in enumerate(zip(value.shape, spec.shape, strict=True)):
            if axis > 0 and want is not None and got != want:
                raise DataError(
                    f"{where}: input {spec.name!r} has shape {value.shape} but the model expects "
                    f"{spec.describe()} (axis {axis} differs)"
                )
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


def _array_chunks(path: Path) -> tuple[Callable[[], Iterator[Feed]], int | None]:
    """.npz (arrays keyed by input name), .npy (one input), or a folder of .npz chunks or of .npy (one per input)."""
    if path.is_dir():
        parts = sorted(path.glob("*.npz"))
        if parts:
            readers = [_array_chunks(p) for p in parts]
            sizes = [n for _, n in readers]
            total = None if None in sizes else sum(sizes)  # type: ignore[arg-type]
            return (lambda: (feed for chunks, _ in readers for feed in chunks())), total
    sources = tensor_batches(path, batch_size=_CHUNK)
    names = list(sources)

    def chunks() -> Iterator[Feed]:
        for arrays in zip(*(sources[n] for n in names), strict=False):
            yield dict(zip(names, arrays, strict=True))

    return chunks, _first_axis(path, names)


_CHUNK = 256  # samples read from a file at a time


def _first_axis(path: Path, names: list[str]) -> int | None:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return int(archive[names[0]].shape[0])
        file = path if path.suffix == ".npy" else path / f"{names[0]}.npy"
        return int(np.load(file, mmap_mode="r", allow_pickle=False).shape[0])
    except (IndexError, OSError, ValueError):
        return None


def load_function(spec: str) -> Callable[..., Any]:
    """The function ``module:function`` names, imported from the current folder or the path."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise DataError(f"{spec!r}: a Python function is written module:function")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"{spec!r}: cannot import module {module_name!r} ({exc}); run from its folder") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DataError(f"{spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


def _callable_chunks(spec: str) -> Callable[[], Iterator[Feed]]:
    function = load_function(spec)

    def chunks() -> Iterator[Feed]:
        result = function()
        if isinstance(result, Mapping):
            yield result
            return
        try:
            yield from result
        except TypeError:
            raise DataError(f"{spec!r} returned {type(result).__name__}; return an iterable of feed dicts") from None

    return chunks


def open_feeds(
    source: Any, inputs: Sequence[InputSpec], *, image_options: Any = None, role: str = "calibration data"
) -> FeedSource:
    """A :class:`FeedSource` for the model inputs ``inputs`` from any supported source:

    - a path: .npz (arrays keyed by input name, first axis = samples), .npy (one-input models), a folder of
      .npz / .npy files, or a folder of images (preprocessed as ``image_options``, an
      :class:`lowbit.images.ImageOptions`, says);
    - ``"module:function"``: a function that returns an iterable of feed dicts;
    - in Python: an array (one-input models; first axis = samples), a dict of arrays, an iterable of feed dicts,
      or a callable returning one.

    ``role`` ("calibration data", "evaluation data") names data that has no file name in messages.
    """
    inputs = tuple(inputs)
    if isinstance(source, np.ndarray):
        if len(inputs) != 1:
            raise DataError(
                f"{role}: one array feeds a one-input model, but the model has {len(inputs)} inputs "
                f"({_expected(inputs)}); pass a dict of input name -> array"
            )
        source = {inputs[0].name: source}
    if isinstance(source, Mapping):
        feed = check_feed(source, inputs, role)
        check_finite(feed, role)
        return FeedSource(lambda: iter([feed]), _samples(feed), role, inputs)
    if isinstance(source, str) and ":" in source and not Path(source).exists() and not source[1:3] == ":\\":
        return FeedSource(_callable_chunks(source), None, source, inputs)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise DataError(
                f"{path} does not exist; {role} is a .npz/.npy file, a folder of them or of images, or module:function"
            )
        from lowbit import images

        if path.is_dir() and images.list_images(path):
            if len(inputs) != 1:
                raise DataError(f"{path} holds images, but the model has {len(inputs)} inputs: {_expected(inputs)}")
            return images.image_source(path, inputs[0], image_options)
        if path.is_dir() and not any(path.glob("*.np[yz]")):
            raise DataError(
                f"{path} holds no images ({', '.join(images.EXTENSIONS[:3])}, ...) and no .npy/.npz files; "
                f"{role} is a .npz/.npy file, a folder of them or of images, or module:function"
            )
        chunks, n = _array_chunks(path)
        if path.suffix == ".npy" and len(inputs) == 1:  # a lone .npy file's name is no input name: no warning
            chunks = _unnamed(chunks)
        return FeedSource(chunks, n, str(path), inputs)
    if callable(source):
        return FeedSource(lambda: iter(source()), None, getattr(source, "__name__", role), inputs)
    if isinstance(source, Iterable):
        items = source if isinstance(source, (list, tuple)) else list(source)
        return FeedSource(lambda: iter(items), None, role, inputs)
    raise DataError(f"cannot read {role} from a {type(source).__name__}")


def _unnamed(chunks: Callable[[], Iterator[Feed]]) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: (next(iter(feed.values())) for feed in chunks())
