"""Calibration data sources.

Today: named tensors saved as NumPy files, streamed in batches along their first axis without loading a whole
file into memory (.npy files are memory-mapped).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError


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
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
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
