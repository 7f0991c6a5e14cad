"""TensorRT's INT8 calibration cache, the text file that implicit-quantization builds read.

    TRT-8601-EntropyCalibration2
    input: 3c010204
    conv1_out: 3d4ccccd

The first line names the TensorRT version and the algorithm; then one line per tensor with the big-endian bits
of its float32 scale, ``scale = amax / 127`` (so amax 1.0 -> 1/127 -> ``3c010204``).
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lowbit._io import atomic_write_text
from lowbit.errors import FormatError

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
DEFAULT_VERSION = "8601"  # TensorRT 8.6.1; set the version your TensorRT writes if it checks the header
_HEADER = re.compile(r"^TRT-([^-\s]+)-(\w+)$")
_LINE = re.compile(r"^(.+): ([0-9a-fA-F]{8})$")


def scale_to_hex(scale: float) -> str:
    """The 8 hex digits of a float32 scale, big-endian. ``scale_to_hex(1 / 127) == '3c010204'``."""
    return struct.pack(">f", np.float32(scale)).hex()


def hex_to_scale(digits: str) -> float:
    """The float32 scale of 8 hex digits."""
    return struct.unpack(">f", bytes.fromhex(digits))[0]


@dataclass
class TrtCache:
    """A parsed calibration cache: per-tensor scales (amax / 127)."""

    scales: dict[str, float] = field(default_factory=dict)
    algorithm: str = "EntropyCalibration2"
    version: str = DEFAULT_VERSION

    def amax(self) -> dict[str, float]:
        """Per-tensor thresholds, scale * 127."""
        return {name: float(np.float32(s) * np.float32(127.0)) for name, s in self.scales.items()}


def format_trt_cache(
    amax: Mapping[str, float], *, algorithm: str = "EntropyCalibration2", version: str = DEFAULT_VERSION
) -> str:
    """The text of a cache holding ``amax`` (tensor name -> symmetric threshold)."""
    if algorithm not in ALGORITHMS:
        raise FormatError(f"unknown TensorRT calibration algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    if not re.fullmatch(r"[^-\s]+", str(version)):
        raise FormatError(f"the TensorRT version in a cache header is one token like '8601', got {version!r}")
    lines = [f"TRT-{version}-{algorithm}"]
    for name, value in amax.items():
        if not name or "\n" in name or "\r" in name:
            raise FormatError(f"tensor name {name!r} cannot be written to a calibration cache (empty or multi-line)")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise FormatError(f"tensor {name!r}: amax must be a finite number >= 0, got {value}")
        lines.append(f"{name}: {scale_to_hex(np.float32(value) / np.float32(127.0))}")
    return "\n".join(lines) + "\n"


def write_trt_cache(
    path: str | os.PathLike,
    amax: Mapping[str, float],
    *,
    algorithm: str = "EntropyCalibration2",
    version: str = DEFAULT_VERSION,
) -> None:
    """Write a TensorRT calibration cache (atomically).

    >>> format_trt_cache({"input": 1.0}).splitlines()
    ['TRT-8601-EntropyCalibration2', 'input: 3c010204']
    """
    atomic_write_text(path, format_trt_cache(amax, algorithm=algorithm, version=version))


def parse_trt_cache(text: str, source: str = "calibration cache") -> TrtCache:
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise FormatError(
            f"{source} is empty; a TensorRT calibration cache starts with a line like TRT-8601-EntropyCalibration2"
        )
    header = _HEADER.match(lines[0].strip())
    if not header:
        raise FormatError(
            f"{source}, line 1: expected a header like 'TRT-8601-EntropyCalibration2', got {lines[0][:80]!r}"
        )
    cache = TrtCache(algorithm=header.group(2), version=header.group(1))
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        match = _LINE.match(line.strip())
        if not match:
            raise FormatError(f"{source}, line {number}: expected 'tensor_name: 8 hex digits', got {line[:80]!r}")
        cache.scales[match.group(1)] = hex_to_scale(match.group(2))
    return cache


def read_trt_cache(path: str | os.PathLike) -> TrtCache:
    """Parse a TensorRT calibration cache file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise FormatError(f"{os.fspath(path)} is not a text TensorRT calibration cache") from None
    return parse_trt_cache(text, os.fspath(path))
