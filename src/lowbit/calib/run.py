"""Calibrate named tensor streams with one or more methods, then measure what each range costs.

One pass feeds every batch to every method's calibrator, so comparing five methods costs one read of the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lowbit.calib.base import Calibrator, available, create
from lowbit.core import QuantSpec, fake_quant, qparams
from lowbit.errors import CalibrationError


@dataclass(frozen=True)
class RangeResult:
    """One tensor, one method: the range, its quantization parameters, and the SQNR it gives on the data."""

    tensor: str
    method: str
    lo: float
    hi: float
    scale: float
    zero_point: int
    sqnr_db: float

    @property
    def amax(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _total(sources: Mapping[str, Iterable]) -> int | None:
    try:
        return sum(len(s) for s in sources.values())  # type: ignore[arg-type]
    except TypeError:
        return None


def calibrate(
    sources: Mapping[str, Iterable[np.ndarray]],
    methods: Sequence[str] = ("entropy",),
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    skip_nonfinite: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, Calibrator]]:
    """``{tensor: {method: calibrator}}`` after one streaming pass over every tensor's batches.

    ``sources`` maps tensor names to re-iterable batch streams; ``options`` maps a method to its options.
    """
    options = options or {}
    result: dict[str, dict[str, Calibrator]] = {}
    with tqdm(total=_total(sources), unit="batch", desc="calibrating", disable=not progress) as bar:
        for tensor, batches in sources.items():
            calibrators = {
                m: create(m, tensor=tensor, skip_nonfinite=skip_nonfinite, **options.get(m, {})) for m in methods
            }
            for batch in batches:
                for calibrator in calibrators.values():
                    calibrator.update(batch)
                bar.update(1)
            result[tensor] = calibrators
    return result


def evaluate(
    sources: Mapping[str, Iterable[np.ndarray]],
    calibrators: Mapping[str, Mapping[str, Calibrator]],
    spec: QuantSpec = QuantSpec(),
    *,
    progress: bool = True,
) -> list[RangeResult]:
    """Quantize every tensor with each method's range under ``spec`` and measure the SQNR in dB,
    ``10 * log10(sum x^2 / sum (x - fake_quant(x))^2)``, over all of its batches (a second pass).
    """
    ranges = {tensor: {m: c.compute() for m, c in by_method.items()} for tensor, by_method in calibrators.items()}
    params = {
        tensor: {method: (r, *qparams(*r, spec)) for method, r in by_method.items()}
        for tensor, by_method in ranges.items()
    }
    results = []
    with tqdm(total=_total(sources), unit="batch", desc="measuring SQNR", disable=not progress) as bar:
        for tensor, batches in sources.items():
            signal = 0.0
            noise = dict.fromkeys(params[tensor], 0.0)
            for batch in batches:
                x = np.asarray(batch, dtype=np.float32)
                x = x[np.isfinite(x)]
                signal += float(np.dot(x.astype(np.float64), x))
                for method, (_, scale, zp) in params[tensor].items():
                    err = (fake_quant(x, scale, zp, spec) - x).astype(np.float64)
                    noise[method] += float(np.dot(err, err))
                bar.update(1)
            for method, (rng, scale, zp) in params[tensor].items():
                sqnr = math.inf if noise[method] == 0 else 10 * math.log10(max(signal, 1e-300) / noise[method])
                results.append(RangeResult(tensor, method, float(rng.lo), float(rng.hi), float(scale), int(zp), sqnr))
    return results


def method_list(text: str) -> list[str]:
    """The methods a comma-separated list names; ``"all"`` is every method, entropy first (it is the one a
    TensorRT calibration cache takes, as TensorRT's own calibrator would). An unknown name lists the known ones."""
    if text == "all":
        return ["entropy", *(m for m in available() if m != "entropy")]
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m not in available():
            raise CalibrationError(f"unknown method {m!r}; known methods: {', '.join(available())} (or 'all')")
    return methods


@dataclass
class Comparison:
    """Several methods' ranges of the same tensors, side by side (see :func:`compare_methods`); ``methods[0]``
    is the primary one (what a TensorRT cache and saved statistics take)."""

    spec: QuantSpec
    methods: list[str]
    calibrators: dict[str, dict[str, Calibrator]]
    results: list[RangeResult]

    def best(self) -> dict[str, RangeResult]:
        """The range with the highest SQNR of each tensor."""
        out: dict[str, RangeResult] = {}
        for r in self.results:
            if r.tensor not in out or r.sqnr_db > out[r.tensor].sqnr_db:
                out[r.tensor] = r
        return out

    def amax(self) -> dict[str, float]:
        """The primary method's symmetric amax of each tensor."""
        return {r.tensor: r.amax for r in self.results if r.method == self.methods[0]}

    def primary(self) -> dict[str, Calibrator]:
        """The primary method's calibrator of each tensor."""
        return {t: by_method[self.methods[0]] for t, by_method in self.calibrators.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "results": [r.to_dict() for r in self.results]}


def compare_methods(
    sources: Mapping[str, Iterable[np.ndarray]],
    methods: Sequence[str],
    spec: QuantSpec,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    skip_nonfinite: bool = False,
    progress: bool = True,
) -> Comparison:
    """Calibrate every tensor with each method in one pass, then measure each range's SQNR under ``spec`` in a
    second (:func:`calibrate`, :func:`evaluate`)."""
    calibrators = calibrate(sources, methods, options=options, skip_nonfinite=skip_nonfinite, progress=progress)
    results = evaluate(sources, calibrators, spec, progress=progress)
    return Comparison(spec, list(methods), calibrators, results)
