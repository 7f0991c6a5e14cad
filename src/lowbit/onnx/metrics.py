"""What "keeps its accuracy" means for one model: a score of an ONNX Runtime session, and the drop from FP32.

- ``cosine``: mean cosine similarity of the first output to FP32's over the evaluation samples (FP32 scores 1).
  The drop is ``1 - cosine``: ``--max-drop 0.002`` asks for a cosine of at least 0.998.
- ``agreement``: the percentage of samples whose top-1 class matches FP32's (FP32 scores 100); drop in points.
- ``accuracy``: top-1 accuracy in percent against labels; drop in points from FP32's accuracy.
- ``relerr``: the relative error of the first output to FP32's over every evaluation sample at once,
  ``||out - fp32|| / ||fp32||`` (all values of all samples in one vector), so it sees the error of any output,
  one value per sample (a sigmoid score, where a cosine is always 1) included. The score is minus that error
  (FP32 scores 0, higher is better) and the drop is the error itself: ``--max-drop 0.01`` asks for outputs within
  1% of FP32's, which is an SQNR (the summary's ``SQNR ... dB``) of at least 40 dB: a drop of X is
  ``-20 log10(X)`` dB (0.1: 20 dB, 0.03: about 30 dB, 0.001: 60 dB). An output holding NaN or Inf where FP32's
  is finite scores the worst relative error, :data:`WORST_RELERR`, beyond any budget (samples where FP32's own
  output is not finite are left out: there is nothing to compare with).
- a Python function ``f(session) -> float`` (``--eval module:function`` with one parameter): any score where
  higher is better; drop in its own units.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnxruntime as ort

from lowbit import sampling
from lowbit.analysis import MAX_SQNR_DB, cosine_rows, finite_rows
from lowbit.data import DataError, Feed, InputSpec, load_function, open_feeds
from lowbit.onnx.model import batch_size_for, input_specs, load_model
from lowbit.onnx.settings import HOLDOUT, Options

METRICS = ("cosine", "agreement", "accuracy", "relerr")
# The relative error of an output that holds NaN/Inf (or of any error against an all-zero FP32 output): that of the
# -300 dB floor the SQNR figures use, finite so that it goes into JSON, and beyond any budget.
WORST_RELERR = 10 ** (MAX_SQNR_DB / 20)


class Metric:
    """A score of a session (higher is better) and the reference FP32 scored; :meth:`drop` is the difference."""

    name = ""
    unit = ""

    def __init__(self):
        self.reference: float | None = None
        # The samples an agreement score counts, once prepared. (Not for accuracy: its drop compares two scores on
        # the same samples, whose paired noise is smaller than either score's own.)
        self.samples: int | None = None

    def prepare(self, float_session: ort.InferenceSession) -> float:
        """Score the FP32 session (and keep what later scores compare with); returns its score."""
        self.reference = self.score(float_session)
        return self.reference

    def score(self, session: ort.InferenceSession) -> float:
        raise NotImplementedError

    def drop(self, score: float) -> float:
        if self.reference is None:
            raise RuntimeError("call prepare(float_session) first")
        return self.reference - score

    def describe(self, value: float) -> str:
        return f"{value:.4f}{self.unit}"


class OutputMetric(Metric):
    """``cosine``, ``agreement``, ``accuracy`` or ``relerr`` over the first output of the model on ``feeds``."""

    def __init__(self, kind: str, feeds: Iterable[Feed], labels: np.ndarray | None = None):
        super().__init__()
        if kind not in METRICS:
            raise DataError(f"unknown metric {kind!r}; metrics: {', '.join(METRICS)} or --eval module:function")
        if kind == "accuracy" and labels is None:
            raise DataError("the accuracy metric needs labels (--labels FILE.npy: one integer class per sample)")
        self.name, self.feeds = kind, feeds
        self.unit = " %" if kind in ("agreement", "accuracy") else ""
        self.labels = None if labels is None else np.asarray(labels).reshape(-1)
        self.outputs: list[np.ndarray] = []

    def _run(self, session: ort.InferenceSession) -> list[np.ndarray]:
        name = session.get_outputs()[0].name
        return [session.run([name], dict(feed))[0] for feed in self.feeds]

    def prepare(self, float_session: ort.InferenceSession) -> float:
        self.outputs = self._run(float_session)
        if not self.outputs:
            raise DataError("the evaluation data yielded no samples")
        n = sum(len(o) for o in self.outputs)
        if self.name in ("agreement", "accuracy") and any(o.ndim != 2 or o.shape[1] < 2 for o in self.outputs):
            raise DataError(
                f"the {self.name} metric needs a classifier output (samples, classes); the model's first output "
                f"has shape {self.outputs[0].shape}: use --metric relerr (its relative error to FP32, which sees "
                "the error of one value per sample) or cosine"
            )
        if self.labels is not None and len(self.labels) != n:
            raise DataError(f"{len(self.labels)} labels for {n} evaluation samples: give one label per sample")
        self.reference = self._score(self.outputs)
        self.samples = n if self.name == "agreement" else None
        return self.reference

    def score(self, session: ort.InferenceSession) -> float:
        return self._score(self._run(session))

    def _score(self, outputs: list[np.ndarray]) -> float:
        """The score over every sample; a sample whose output holds NaN/Inf counts as a miss (cosine 0, a top-1
        that matches nothing), never as agreement; for ``relerr`` it makes the error :data:`WORST_RELERR`."""
        if self.name == "relerr":
            return 0.0 - relative_error(self.outputs, outputs)  # not -0.0 for FP32
        finite = np.concatenate([finite_rows(o) for o in outputs])
        if self.name == "cosine":
            cos = np.concatenate([cosine_rows(a, b) for a, b in zip(self.outputs, outputs, strict=True)])
            return float(np.where(finite, cos, 0.0).mean())
        top = np.where(finite, np.concatenate([o.argmax(axis=1) for o in outputs]), -1)
        if self.name == "agreement":
            ref = np.concatenate([o.argmax(axis=1) for o in self.outputs])
            return float((top == ref).mean() * 100)
        return float((top == self.labels).mean() * 100)


def relative_error(references: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """``||out - ref|| / ||ref||`` over every value of every batch at once (any shape: one value per sample too),
    at most :data:`WORST_RELERR`. Samples whose reference is not finite are left out; a non-finite output on any
    other sample, or any error against an all-zero reference, is :data:`WORST_RELERR`."""
    signal = noise = 0.0
    for ref, out in zip(references, outputs, strict=True):
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape:
            raise DataError(f"the output's shape {out.shape} differs from FP32's {ref.shape}")
        keep = finite_rows(ref) if ref.ndim else np.isfinite(ref).reshape(1)
        ref = ref.reshape(len(keep), -1)[keep].astype(np.float64)
        out = out.reshape(len(keep), -1)[keep].astype(np.float64)
        if not np.isfinite(out).all():
            return WORST_RELERR
        signal += float((ref * ref).sum())
        noise += float(((out - ref) ** 2).sum())
    if noise == 0:
        return 0.0
    if signal == 0:
        return WORST_RELERR
    return min(WORST_RELERR, float(np.sqrt(noise / signal)))


class FunctionMetric(Metric):
    """A user's ``f(session) -> float``, higher is better."""

    def __init__(self, function: Callable[[ort.InferenceSession], float], name: str):
        super().__init__()
        self.function, self.name = function, name

    def score(self, session: ort.InferenceSession) -> float:
        value = self.function(session)
        try:
            return float(value)
        except (TypeError, ValueError):
            message = f"{self.name} returned {type(value).__name__}; a metric function returns a number"
            raise DataError(message) from None


def is_metric_function(source: Any) -> bool:
    """True when ``source`` (``module:function`` or a callable) is a metric: a function of one required
    argument (the session). A function of none returns evaluation data instead."""
    if isinstance(source, str):
        if ":" not in source or os.path.exists(source):
            return False
        function = load_function(source)
    elif callable(source):
        function = source
    else:
        return False
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) >= 1


def function_metric(source: Any) -> FunctionMetric:
    function = load_function(source) if isinstance(source, str) else source
    return FunctionMetric(function, source if isinstance(source, str) else getattr(function, "__name__", "metric"))


def load_labels(path: str | os.PathLike) -> np.ndarray:
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read labels from {path}: {exc}; give a .npy of integer classes") from None
    if isinstance(labels, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: labels are one .npy array of integer classes, not a .npz")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be integer classes, got dtype {labels.dtype}")
    return labels.reshape(-1)


def budget_metric(model: str | os.PathLike, kind: str, data: Any, labels, options: Options, *, held_out: bool):
    """The metric a budget is measured with: ``kind`` (cosine, agreement, accuracy against ``labels``, relerr) over
    all of ``data`` (evaluation data), or with ``held_out`` over the samples :func:`lowbit.onnx.quantize` holds out
    of ``data`` (the calibration data) for its comparison."""
    inputs = tuple(InputSpec(*spec) for spec in input_specs(load_model(model)))
    role = "calibration data" if held_out else "evaluation data"
    source = open_feeds(data, inputs, image_options=options.image_options, role=role)
    batch = batch_size_for(inputs, options.batch_size)
    if held_out:
        source = sampling.split(source, options.max_samples, HOLDOUT).held
        if source is None:
            raise DataError(
                f"a budget needs samples to measure on: {data} has too few to hold any out of calibration; give "
                "evaluation data (--eval)"
            )
    return OutputMetric(kind, source.batches(batch), labels)
