"""How the ONNX front end chooses the weights' integer codes: a registry of weight-rounding methods.

A method gathers what it needs in the one calibration pass (:meth:`WeightRounding.observers`: objects with
``update(array)`` fed the batches of one tensor) and then returns the codes of the weights it chose
(:meth:`WeightRounding.codes`); weights it leaves out are rounded to their nearest code when the model is built.
Adding a method is one class with ``@register("name")``.

>>> available()
['gptq', 'nearest', 'stochastic']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx

from lowbit.core import QuantSpec, quantize
from lowbit.errors import SpecError
from lowbit.onnx import gptq
from lowbit.onnx.graph import Graph
from lowbit.onnx.placement import Plan

Rerun = tuple[onnx.ModelProto, Callable[[], Iterable[Mapping[str, np.ndarray]]]]


class WeightRounding:
    """Nearest rounding: nothing to gather, no codes chosen ahead of the build."""

    name = "nearest"

    def observers(self, graph: Graph, plan: Plan, samples: int | None) -> list[tuple[str, object]]:
        """``(tensor, observer)`` pairs to feed in the calibration pass; ``samples``: calibration samples, if known."""
        return []

    # The model and a function that gives the calibration batches again (set before :meth:`codes` when the
    # batches can be read again), for a method that needs more passes over the data than the calibration pass.
    rerun: Rerun | None = None

    def codes(self, graph: Graph, observers: list, scales: dict[str, np.ndarray], progress: bool) -> dict:
        """The int8 codes of the weights this method chose at their ``scales``, by weight name."""
        return {}


_METHODS: dict[str, type[WeightRounding]] = {}


def register(name: str) -> Callable[[type[WeightRounding]], type[WeightRounding]]:
    """Class decorator: make a :class:`WeightRounding` subclass the method called ``name``."""

    def add(cls: type[WeightRounding]) -> type[WeightRounding]:
        cls.name = name
        _METHODS[name] = cls
        return cls

    return add


def available() -> list[str]:
    return sorted(_METHODS)


def get(name: str) -> WeightRounding:
    """The method called ``name``; an unknown name lists the methods."""
    if name not in _METHODS:
        raise SpecError(f"unknown weight rounding {name!r} for ONNX models; choose one of {', '.join(available())}")
    return _METHODS[name]()


register("nearest")(WeightRounding)


@register("gptq")
class GPTQ(WeightRounding):
    """GPTQ (Frantar et al. 2022): each weight's codes for the least output error on the calibration data, from
    the second moment of its layer's input (:mod:`lowbit.onnx.gptq`). The second moments that fit
    :attr:`budget` bytes are gathered in the calibration pass; the others in more passes over the data
    (:func:`lowbit.onnx.gptq.gather`), when the calibration batches can be read again."""

    budget = gptq.HESSIAN_BUDGET

    def observers(self, graph, plan, samples):
        self.passes = gptq.passes(gptq.single_readers(gptq.layers(graph, plan, samples)), self.budget)
        self.first = gptq.Pass.start(self.passes[0] if self.passes else [])
        self.peak_bytes = 0
        return self.first.observers()

    def codes(self, graph, observers, scales, progress):
        out = gptq.codes(graph, self.first.views(), scales, progress=progress)
        self.peak_bytes = self.first.bytes
        rest = [layer for group in self.passes[1:] for layer in group]
        if rest and self.rerun is not None:
            model, feeds = self.rerun
            for step in gptq.gather(model, rest, feeds, budget=self.budget, progress=progress):
                out.update(gptq.codes(graph, step.views(), scales, progress=progress))
                self.peak_bytes = max(self.peak_bytes, step.bytes)
        return out


@register("stochastic")
class Stochastic(WeightRounding):
    """Stochastic rounding: each weight element takes ``floor(w / s + u)``, u ~ U[0, 1), at its calibrated scale
    (an unbiased code, where nearest rounding is biased per element); seeded with :attr:`seed` (one generator over
    the weights in plan order), so a run repeats."""

    seed = 0

    def observers(self, graph, plan, samples):
        self.axes = dict(plan.weights)  # the codes need each weight's channel axis; nothing to observe
        return []

    def codes(self, graph, observers, scales, progress):
        rng = np.random.default_rng(self.seed)
        out = {}
        for name, scale in scales.items():
            w = graph.value(name).astype(np.float32)
            axis = self.axes.get(name) if np.ndim(scale) else None
            spec = QuantSpec(axis=axis, rounding="stochastic")
            out[name] = quantize(w, scale, np.zeros(np.shape(scale), np.int8), spec, rng=rng)
        return out
