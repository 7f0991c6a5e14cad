"""Fashion-MNIST from the system's dataset folder (IDX files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lowbit.errors import FormatError
from lowbit.examples.common import ExampleError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # of the 60,000 training images
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): big-endian magic ``0 0 dtype ndim``, ndim uint32 sizes, then the data."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise FormatError(f"cannot read the IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise FormatError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise FormatError(f"{path} is truncated: {data.size} bytes of data for shape {dims}")
    return data.reshape(dims)


def fashion_mnist(split: str = "test", folder: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (Xiao et al. 2017) from Debian's ``dataset-fashion-mnist`` (60,000 train and 10,000 test
    28x28 images of 10 clothing classes): float32 ``(N, 1, 28, 28)`` normalised with the training set's mean and
    std, and int64 labels. ``split``: "train" or "test"."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(folder) if folder is not None else FASHION_MNIST_DIR
    images = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels = folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise ExampleError(
            f"Fashion-MNIST is not in {folder}: install Debian's package (apt-get install dataset-fashion-mnist)"
        )
    x = _read_idx(images).astype(np.float32)[:, None] / np.float32(255.0)
    y = _read_idx(labels).astype(np.int64)
    if len(x) != len(y):
        raise FormatError(f"{images.name} has {len(x)} images but {labels.name} has {len(y)} labels")
    return ((x - np.float32(FASHION_MEAN)) / np.float32(FASHION_STD)).astype(np.float32), y
