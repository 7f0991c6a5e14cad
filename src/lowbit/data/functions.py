"""Data from Python: ``module:function`` names a function that returns an iterable of feed dicts."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lowbit.data.feeds import DataError, Feed, FeedSource
from lowbit.data.sources import register_source


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


def _is_function_spec(source: Any) -> bool:
    return (
        isinstance(source, str) and ":" in source and not Path(source).exists() and not source[1:3] == ":\\"
    )  # C:\\ is a Windows drive, not a module


@register_source("module:function", _is_function_spec, priority=20)
def _open_function(source: str, inputs, image_options, role: str) -> FeedSource:
    return FeedSource(_callable_chunks(source), None, source, inputs)
