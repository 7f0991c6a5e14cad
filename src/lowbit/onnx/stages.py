"""The stages :func:`lowbit.onnx.quantize` and :func:`lowbit.onnx.analyze` are made of, each a function:
open the model, open the data, calibrate once, rank the layers and search mixed precision.

    model = open_model(path, settings)            # load, preprocess, fuse activations, check the exclusions
    data = open_data(model, calib, eval_data, options)
    calibrated = calibrate(model, settings, data.calib, options)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from tqdm.auto import tqdm

from lowbit.data import FeedSource, InputSpec, open_feeds
from lowbit.onnx import activations, controlflow, easyquant, fp8, mixed, placement
from lowbit.onnx.calibration import Calibrated, calibrate_model
from lowbit.onnx.graph import Graph
from lowbit.onnx.model import batch_size_for, free_batch, input_specs, load_model, preprocess
from lowbit.onnx.sensitivity import layer_sensitivity
from lowbit.onnx.settings import Budget, Options, Settings


@dataclass
class Model:
    """A model as the stages read it: the file's model, its preprocessed float graph, its inputs, and the batch
    it runs at (fixed by the model, else the one asked for)."""

    path: Path
    original: onnx.ModelProto
    float_model: onnx.ModelProto
    graph: Graph
    inputs: tuple[InputSpec, ...]
    batch: int
    fused: dict[str, int] = field(default_factory=dict)  # decomposed activations rewritten as one op, by op


def open_model(path: Path, settings: Settings, batch_size: int) -> Model:
    """Load and preprocess the model at ``path``, rewrite its decomposed activations as single ops and, for a
    target that runs them best so, lower those on integer paths to integer ops (:mod:`lowbit.onnx.activations`);
    a recipe exclusion that names nothing in it is an error. An FP8 recipe first raises the model to opset 19
    (FLOAT8 Q/DQ; :func:`lowbit.onnx.fp8.raised`)."""
    original = load_model(path)
    float_model = preprocess(fp8.raised(original, settings.format) if fp8.is_fp8(settings.format) else original)
    lowering = not settings.dynamic and settings.weight_only is None and settings.target.integer_activations
    # weight-only leaves every op but MatMul/Gemm as it is: no activation is rewritten
    fused = activations.fuse(float_model, lowering) if settings.weight_only is None else {}
    if lowering:
        activations.lower(float_model)
    controlflow.localize(float_model)  # the weights a body reads become its own, to be quantized there
    graph = Graph(float_model)
    placement.check_exclusions(graph, settings.config.exclude, settings.exclude_ops)
    names = [graph.node_name(n) for n in graph.nodes]
    for glob in settings.float_globs:
        if not any(fnmatch.fnmatchcase(name, glob) for name in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise placement.ExclusionError(
                f"override {glob!r} matches no node of the model (node names are e.g. {sample})"
            )
    inputs = tuple(InputSpec(*s) for s in input_specs(float_model))
    return Model(path, original, float_model, graph, inputs, batch_size_for(inputs, batch_size), fused)


@dataclass
class Data:
    """The calibration source and the evaluation source (None when none was given)."""

    calib: FeedSource | None
    eval: FeedSource | None


def open_data(model: Model, calib: Any, eval_data: Any, options: Options) -> Data:
    """Open the data sources for ``model``'s inputs; the evaluation data is read through once (shape, dtype,
    NaN/Inf), so that data that does not fit is an error before anything is computed or written."""
    image = options.image_options
    eval_source = (
        open_feeds(eval_data, model.inputs, image_options=image, role="evaluation data")
        if eval_data is not None
        else None
    )
    source = open_feeds(calib, model.inputs, image_options=image) if calib is not None else None
    if eval_source is not None:
        read_through(eval_source, model.batch, "evaluation data", options.progress)
    return Data(source, eval_source)


def read_through(source: FeedSource, batch: int, what: str, progress: bool) -> None:
    """Read every batch of ``source`` once (see :func:`open_data`)."""
    batches = source.batches(batch)
    with tqdm(total=len(batches) or None, desc=f"checking {what}", unit="batch", disable=not progress,
              leave=False) as bar:  # fmt: skip
        for _ in batches:
            bar.update(1)


def calibration_batch(model: Model, options: Options) -> tuple[int, onnx.ModelProto | None]:
    """The batch calibration runs at and the model it runs: a model fixed at batch 1 calibrates at the batch size
    asked for through a copy with a free batch dimension (:func:`lowbit.onnx.model.free_batch`)."""
    if model.batch == 1 < options.batch_size:
        run_model = free_batch(model.float_model, options.batch_size)
        if run_model is not None:
            return options.batch_size, run_model
    return model.batch, None


def calibrate(
    model: Model, settings: Settings, source: FeedSource, options: Options, *, every_tensor: bool, observers=None
) -> Calibrated:
    """Calibrate once on ``source`` (see :func:`lowbit.onnx.calibration.calibrate_model`), at the batch of
    :func:`calibration_batch`; then the recipe's refinement (``refine="easyquant"``: :mod:`lowbit.onnx.easyquant`)."""
    batch, run_model = calibration_batch(model, options)
    batches = source.batches(batch)
    refine = None
    if settings.config.refine == "easyquant":

        def refine(calibrated: Calibrated) -> None:
            # the model's own batch: the search runs the float model itself
            first = lambda n: source.batches(model.batch, 0, n)  # noqa: E731
            calibrated.refinement = easyquant.refine(calibrated, first, progress=options.progress)

    return calibrate_model(
        model.float_model,
        batches,
        settings,
        samples=source.num_samples,
        every_tensor=every_tensor,
        total=len(batches) or None,
        progress=options.progress,
        observers=observers,
        run_model=run_model,
        refine=refine,
    )


def search(calibrated: Calibrated, layers: list[str], budget: Budget, sample_feeds, progress: bool):
    """Automatic mixed precision: rank ``layers`` by their own sensitivity on ``sample_feeds`` (most sensitive
    first) and keep the fewest of them in float that bring the metric within the budget
    (:func:`lowbit.onnx.mixed.search`)."""
    errors = layer_sensitivity(calibrated, layers, sample_feeds, progress=progress)
    ranked = sorted(layers, key=lambda name: (errors[name][1].sqnr_db, errors[name][1].cosine))
    return mixed.search(calibrated, ranked, budget.metric, budget.max_drop, progress=progress)
