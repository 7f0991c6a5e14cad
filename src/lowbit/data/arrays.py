"""NumPy files as data: named tensors streamed in batches along their first axis without loading a whole file
into memory (.npy files are memory-mapped), and feeds for a model from a .npz, a .npy or a folder of them."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lowbit.data.feeds import Batches, DataError, Feed, FeedSource, InputSpec
from lowbit.data.images import EXTENSIONS
from lowbit.data.sources import is_path, register_source


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
    scalars = _scalars(path)  # rank-0 arrays: one value (a flag, a sample rate) for every sample of the file
    names = [n for n in sources if n not in scalars]

    def chunks() -> Iterator[Feed]:
        if not names:
            yield dict(scalars)
            return
        for arrays in zip(*(sources[n] for n in names), strict=False):
            yield {**dict(zip(names, arrays, strict=True)), **scalars}

    return chunks, _first_axis(path, names) if names else 1


def _scalars(path: Path) -> dict[str, np.ndarray]:
    """The rank-0 arrays of a .npz, a .npy or a folder of .npy files, by name."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {n: archive[n] for n in archive.files if archive[n].ndim == 0}
        files = [path] if path.suffix == ".npy" else sorted(path.glob("*.npy"))
        arrays = {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in files}
        return {n: np.asarray(a) for n, a in arrays.items() if a.ndim == 0}
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}


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


def _unnamed(chunks: Callable[[], Iterator[Feed]]) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: (next(iter(feed.values())) for feed in chunks())


@register_source("NumPy files", is_path, priority=50)
def _open_arrays(source, inputs: tuple[InputSpec, ...], image_options, role: str) -> FeedSource:
    """Feeds from a .npz (arrays keyed by input name), a .npy (a one-input model) or a folder of them."""
    path = Path(source)
    if path.is_dir() and not any(path.glob("*.np[yz]")):
        raise DataError(
            f"{path} holds no images ({', '.join(EXTENSIONS[:3])}, ...) and no .npy/.npz files; "
            f"{role} is a .npz/.npy file, a folder of them or of images, or module:function"
        )
    chunks, n = _array_chunks(path)
    if path.suffix == ".npy" and len(inputs) == 1:  # a lone .npy file's name is no input name: no warning
        chunks = _unnamed(chunks)
    return FeedSource(chunks, n, str(path), inputs)
