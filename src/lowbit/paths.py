"""Output paths checked before any work: nothing lowbit writes may land on what it reads, or fail after minutes.

Every front end names its outputs and its inputs by the option that gave them, then calls :func:`check_outputs`
once, before loading a model or reading data:

>>> check_outputs({"-o": "out/m_int8.onnx", "--trt-cache": "m.cache"}, {"MODEL": "m.onnx", "--calib": "calib/"})
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError


class PathError(LowbitError, ValueError):
    """An output path that would overwrite an input, collide with another output, or cannot be written."""


def ranges_path_for(output: str | os.PathLike) -> Path:
    """Where ``lowbit quantize`` writes the ranges it chose: ``model_int8.onnx`` -> ``model_int8.ranges.json``."""
    output = Path(output)
    return output.with_name(output.stem + ".ranges.json")


def as_path(source: Any) -> Path | None:
    """``source`` as a path when it names one on disk (a file or folder), else None (arrays, callables,
    ``module:function``, a path that does not exist)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.exists():
            return path
    return None


def _inside(path: Path, folder: Path) -> bool:
    return folder.is_dir() and folder in path.parents


def check_outputs(outputs: Mapping[str, Any], inputs: Mapping[str, Any]) -> None:
    """Raise :class:`PathError` unless every output can be written without touching an input.

    ``outputs`` and ``inputs`` map an option's name (``"-o"``, ``"--calib"``, ``"output"``) to its value; None
    values are skipped, and inputs that are not paths on disk (arrays, functions) are left out. Paths are compared
    resolved, through symlinks. An output may not be an input, lie inside an input folder (the next run would read
    it), equal another output, be an existing folder, or sit where no file can be created (a file as its parent
    folder, no write permission, a read-only file system): each is checked by creating and removing a temporary file
    in the nearest existing folder.
    """
    sources = {name: path.resolve() for name, value in inputs.items() if (path := as_path(value)) is not None}
    seen: dict[Path, str] = {}
    for name, value in outputs.items():
        if value is None:
            continue
        out = Path(value)
        resolved = out.resolve()
        for source_name, source in sources.items():
            if resolved == source:
                raise PathError(
                    f"{name} {out} is the same file as {source_name} {inputs[source_name]}: writing it would "
                    "overwrite it; choose another output path"
                )
            if _inside(resolved, source):
                raise PathError(
                    f"{name} {out} lies inside {source_name} {inputs[source_name]}, which lowbit reads: write it "
                    "elsewhere"
                )
        if resolved in seen:
            raise PathError(f"{name} {out} is also given as {seen[resolved]}: give each output its own path")
        seen[resolved] = name
        if resolved.is_dir():
            raise PathError(f"{name} {out} is a folder: give a file path, e.g. {out / 'model_int8.onnx'}")
        _check_writable(name, out, resolved)


def _check_writable(name: str, out: Path, resolved: Path) -> None:
    folder = resolved.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise PathError(f"{name} {out}: {folder} is a file, not a folder; choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lowbit-probe-", dir=folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PathError(
            f"{name} {out}: cannot write in {folder} ({reason}); choose a folder you can write to"
        ) from None
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(probe)
    if resolved.exists() and not os.access(resolved, os.W_OK):
        raise PathError(f"{name} {out} exists and is read-only: remove it or choose another output path")
