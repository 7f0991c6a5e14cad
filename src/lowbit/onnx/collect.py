"""Stream activations from an ONNX Runtime session into lowbit calibrators, one batch at a time.

The model is run with the tensors to calibrate added as graph outputs; each batch's values go into the
calibrators and are dropped before the next batch runs, so memory does not grow with the number of samples
(ONNX Runtime's own calibrator keeps every intermediate output of the whole calibration set).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from tqdm.auto import tqdm

from lowbit import calib
from lowbit.calib.base import Calibrator
from lowbit.calib.grid import grid_range
from lowbit.errors import CalibrationError
from lowbit.onnx import controlflow
from lowbit.onnx.model import session

# The method that calibrates a graph input instead of the one asked for. Entropy reads a histogram of |x|: an image
# normalised with a mean, whose background is one value (Fashion-MNIST's -0.81), is a spike there, and KL picks
# the spike as the threshold; every brighter pixel is then clipped (Fashion-MNIST's CNN: top-1 92.0% -> 82.8%).
# Data the user feeds is never worth clipping: it keeps its range.
INPUT_METHODS = {"entropy": "minmax"}


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (float32)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in tensors:
        if name not in present:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def collect(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    method: str = "entropy",
    options: Mapping[str, Any] | None = None,
    total: int | None = None,
    progress: bool = True,
    observers: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, Calibrator]:
    """One calibrator of ``method`` per tensor, fed by running ``model`` on each feed dict of ``feeds``.
    ``observers`` (tensor -> objects with ``update(array)``) see their tensor's batches in the same pass.

    The model's inputs are calibrated with ``minmax`` when ``method`` is ``entropy`` (:data:`INPUT_METHODS`)."""
    options = dict(options or {})
    inputs = {i.name for i in model.graph.input}
    calibrators = {
        t: calib.create(INPUT_METHODS[method], tensor=t)
        if t in inputs and method in INPUT_METHODS
        else calib.create(method, tensor=t, **options)
        for t in tensors
    }
    observers = dict(observers or {})
    run_names = [t for t in dict.fromkeys([*tensors, *observers]) if t not in inputs]
    exposed, output_of = controlflow.expose(model, run_names)  # tensors inside If/Loop/Scan bodies too
    missing = [t for t in run_names if t not in output_of]
    if missing:
        raise CalibrationError(f"the model computes no tensor named {missing[0]!r}; nothing to calibrate it on")
    outputs = [output_of[t] for t in run_names]
    sess = session(exposed) if run_names else None
    seen = 0
    bar = tqdm(feeds, total=total, desc=f"calibrating ({method})", unit="batch", disable=not progress, leave=False)
    for feed in bar:
        if sess is not None:
            values = sess.run(outputs, dict(feed))
            for name, value in zip(run_names, values, strict=True):
                _update(name, value, calibrators, observers)
        for name in inputs:
            _update(name, feed.get(name), calibrators, observers)
        seen += 1
    bar.close()
    if seen == 0:
        raise CalibrationError("the calibration data yielded no batches; give at least one sample")
    return calibrators


def _update(name: str, value, calibrators: Mapping[str, Calibrator], observers: Mapping[str, Any]) -> None:
    if value is None:
        return
    if name in calibrators:
        calibrators[name].update(value)
    for observer in observers.get(name, ()):
        observer.update(value)


def ranges(calibrators: Mapping[str, Calibrator], *, symmetric: bool) -> dict[str, tuple[float, float]]:
    """The range of every calibrator: (-amax, amax) when ``symmetric``; otherwise the method's range cut to what
    was observed (a symmetric method's (-amax, amax) on a post-ReLU tensor becomes (0, amax))."""
    return {name: grid_range(c, symmetric) for name, c in calibrators.items()}
