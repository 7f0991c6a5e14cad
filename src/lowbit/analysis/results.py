"""What a sensitivity analysis found, independent of the front end (ONNX or PyTorch): the result types and their
JSON. A layer's :class:`Error` says how far a quantized tensor is from its float value; :class:`LayerReport` gives
it three ways (see :class:`Analysis`); :class:`TensorReport` shows the range each calibrator would choose on a
tensor; :class:`WeightReport` compares per-tensor and per-channel weight quantization; :class:`MixedResult` is the
curve of an automatic mixed-precision search."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import lowbit
from lowbit._table import format_table

MAX_SQNR_DB = 300.0  # what an exact match reports (JSON has no infinity)


@dataclass(frozen=True)
class Error:
    """``sqnr_db``: 10 log10(signal power / error power) over every element (higher is better); ``cosine``: mean
    over samples of the cosine similarity of the flattened tensors; ``max_abs_error``: the largest difference."""

    sqnr_db: float
    cosine: float
    max_abs_error: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerReport:
    name: str
    op_type: str
    output: str
    accumulated: Error
    own: Error
    own_model: Error
    inputs: list[str] = field(default_factory=list)
    index: int = 0  # position in graph order among the quantized layers

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TensorReport:
    """A tensor's histogram (``counts`` over ``edges``) and, per method, the range it chooses and its SQNR."""

    tensor: str
    lo: float
    hi: float
    counts: list[int]
    edges: list[float]
    ranges: dict[str, dict[str, float]]
    chosen: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WeightReport:
    """A weight's SQNR at int8 per tensor and per output channel; every channel's range where per tensor is
    poor (``poor``: more than :data:`POOR_GAP_DB` below per channel)."""

    layer: str
    weight: str
    depthwise: bool
    per_tensor_sqnr_db: float
    per_channel_sqnr_db: float
    poor: bool
    channel_min: list[float] = field(default_factory=list)
    channel_max: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


POOR_GAP_DB = 6.0


@dataclass
class Analysis:
    """Everything :func:`analyze` measured; ``layers`` ranked most sensitive first."""

    model: str
    target: str
    method: str
    samples: int
    calibration_seconds: float
    seconds: float
    output: str
    output_error: Error
    top1_agreement: float | None
    layers: list[LayerReport]
    tensors: dict[str, TensorReport]
    weights: list[WeightReport]
    mixed: Any = None  # a lowbit.onnx.mixed.MixedResult when a budget was searched
    profile: Any = None  # a lowbit.onnx.kernels.Profile when the model was profiled
    extracted: list[str] = field(default_factory=list)

    def table(self, top: int = 15) -> str:
        rows = [
            [i + 1, r.name, r.op_type, f"{r.own_model.sqnr_db:.1f}", format_cosine_gap(r.own_model.cosine),
             f"{r.own.sqnr_db:.1f}", f"{r.accumulated.sqnr_db:.1f}"]
            for i, r in enumerate(self.layers[:top])
        ]  # fmt: skip
        head = (
            f"{len(self.layers)} quantized layers of {self.model} ({self.target}, {self.method}), "
            f"{self.samples} samples; whole model: output SQNR {self.output_error.sqnr_db:.1f} dB, "
            f"1 - cosine {format_cosine_gap(self.output_error.cosine)}"
        )
        if self.top1_agreement is not None:
            head += f", top-1 agreement {self.top1_agreement:.2f}%"
        text = format_table(
            ["rank", "layer", "op", "model SQNR dB", "model 1 - cosine", "own SQNR dB", "accumulated SQNR dB"],
            rows,
            "rllrrrr",
        )
        more = f"\n... and {len(self.layers) - top} more (see the JSON or the report)" if len(self.layers) > top else ""
        return (
            f"{head}\nmost sensitive first; model SQNR / 1 - cosine: the model's output with only that layer "
            f"quantized\n{text}{more}"
        )

    def to_dict(self) -> dict:
        out = {
            "lowbit": lowbit.__version__,
            "model": self.model,
            "target": self.target,
            "method": self.method,
            "samples": self.samples,
            "calibration_seconds": self.calibration_seconds,
            "seconds": self.seconds,
            "output": self.output,
            "output_error": self.output_error.to_dict(),
            "top1_agreement": self.top1_agreement,
            "layers": [r.to_dict() for r in self.layers],
            "tensors": {t: r.to_dict() for t, r in self.tensors.items()},
            "weights": [w.to_dict() for w in self.weights],
            "extracted": self.extracted,
        }
        out["mixed"] = None if self.mixed is None else self.mixed.to_dict()
        out["profile"] = None if self.profile is None else self.profile.to_dict()
        return out


@dataclass
class Step:
    """The model with ``kept`` layers in float (the last one added last) and its score."""

    kept: int
    layer: str | None
    score: float
    drop: float
    weight_bytes: float | None = None  # the quantized layers' weights at their widths (float: 4 bytes), if known


@dataclass
class MixedResult:
    """A mixed-precision search: the metric of FP32 (``reference``), the budget, and one :class:`Step` per model
    tried. ``kind``: ``"float"`` (layers kept in float) or ``"bits"`` (layers given 8-bit weights)."""

    metric: str
    unit: str
    reference: float
    max_drop: float
    steps: list[Step] = field(default_factory=list)
    met: bool = False
    kind: str = "float"
    samples: int | None = None  # the samples a top-1 agreement metric counts; None for other metrics
    order: str = "most sensitive first"  # how the layers were taken, for the report
    # A search that re-rounds the weights for every model it tries (``rounding``: "adaround", "gptq") tries the
    # first k of ``names`` for a few k (found by doubling, then bisection) rather than every k: its steps, sorted by
    # k, are those tried, and the final one is the fewest layers that met the budget.
    names: list[str] | None = None
    rounding: str | None = None
    # The model of the final step, where the search built one per step (re-rounded); not in to_dict()
    model: Any = field(default=None, repr=False, compare=False)

    @property
    def final(self) -> Step:
        """The step the search ends on: the last one, or for a re-rounding search the fewest layers that met the
        budget (the most tried where none did)."""
        if self.names is None:
            return self.steps[-1]
        met = [s for s in self.steps if s.drop <= self.max_drop]
        return min(met, key=lambda s: s.kept) if met else max(self.steps, key=lambda s: s.kept)

    @property
    def layer_column(self) -> str:
        """The heading of a step's layer in tables: the layer it added, or for a search that tried a few k, the k-th."""
        return "k-th layer" if self.names is not None else f"layer {self.action}"

    @property
    def noise(self) -> float | None:
        """One standard error of a top-1 agreement score at the budget line, in points: a score counts
        ``samples`` hits, so a step's score is only known to about this much (None for other metrics)."""
        if not self.samples or self.unit.strip() != "%":
            return None
        return standard_error_points(self.reference - self.max_drop, self.samples)

    @property
    def action(self) -> str:
        """What a step does to its layer, for tables: "kept in float" or "with 8-bit weights"."""
        return "with 8-bit weights" if self.kind == "bits" else "kept in float"

    @property
    def budget_unit(self) -> str:
        """The unit of a drop: points for a percentage."""
        return " points" if self.unit.strip() == "%" else self.unit

    @property
    def kept(self) -> list[str]:
        """The layers kept in float (or widened) by the final step."""
        if self.names is not None:
            return list(self.names[: self.final.kept])
        return [s.layer for s in self.steps[1 : self.steps[-1].kept + 1] if s.layer is not None]

    @property
    def sized(self) -> bool:
        """Whether every step knows its weights' size."""
        return bool(self.steps) and all(s.weight_bytes is not None for s in self.steps)

    def size_note(self) -> str:
        """The weights' size of the first and the last step ('' when unknown)."""
        if not self.sized:
            return ""
        first, last = self.steps[0].weight_bytes, self.final.weight_bytes
        n, ratio = self.final.kept, last / first
        return f"weights {format_bytes(first)} as quantized, {format_bytes(last)} with {n} {self.action} ({ratio:.2f}x)"

    def table(self) -> str:
        rows = []
        for prev, s in zip([None, *self.steps], self.steps, strict=False):
            gain = "" if prev is None else f"{s.score - prev.score:+.4g}"
            row = [s.kept, s.layer or "(all quantized)", f"{s.score:.4f}", f"{s.drop:.4f}", gain]
            rows.append(row + ([format_bytes(s.weight_bytes)] if self.sized else []))
        n = self.final.kept
        verdict = f"within budget with {n} layer(s) {self.action}" if self.met else f"budget not met with {n} layer(s)"
        head = (
            f"mixed precision: {self.metric} FP32 {self.reference:.4f}{self.unit}, budget: drop <= {self.max_drop}"
            f"{self.budget_unit}; {verdict}" + (f"; {self.size_note()}" if self.sized else "")
        )
        if self.rounding:
            head += f"\n(re-rounded by {self.rounding} for every k tried; the layer column is the k-th layer)"
        columns = ["k", self.layer_column, "score", "drop", "gain"] + (["weights"] if self.sized else [])
        table = format_table(columns, rows, "rlrrr" + ("r" if self.sized else ""))
        note = self.noise_note()
        return head + "\n" + table + ("\n" + note if note else "")

    def noise_note(self) -> str:
        """How far a step's score can be trusted, for a top-1 agreement metric ('' otherwise)."""
        noise = self.noise
        if noise is None:
            return ""
        note = (
            f"{self.metric} counted on {self.samples} samples: one standard error is {noise:.2f} points near the budget"
        )
        if 0 < self.max_drop < 4 * noise:
            note += (
                f", large against a budget of {self.max_drop:g} points; the search may stop early on a lucky step. "
                f"Evaluate on more samples (about {_samples_for(self.reference - self.max_drop, self.max_drop / 4)} "
                "bring it to a quarter of the budget)"
            )
        return note + "."

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("steps", "model")}
        out["steps"] = [asdict(s) for s in self.steps]
        out["names"] = None if self.names is None else list(self.names)
        return {**out, "kept": self.kept, "noise": self.noise}


def format_cosine_gap(cosine: float) -> str:
    """``1 - cosine`` in three significant digits, so that small errors read apart (a cosine of 0.9999996 prints
    as 1.00000 to five places); "0" for an exact match, where rounding leaves 1 - cosine at or just below 0.

    >>> format_cosine_gap(0.9999996), format_cosine_gap(1.0)
    ('4.00e-07', '0')
    """
    gap = 1.0 - cosine
    return "0" if gap <= 1e-15 else f"{gap:.2e}"


def format_bytes(n: float) -> str:
    """A size in kB or MB (10^3, 10^6 bytes)."""
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def standard_error_points(percent: float, samples: int) -> float:
    """One standard error, in points, of a percentage near ``percent`` counted on ``samples`` samples
    (binomial: sqrt(p (1 - p) / n)); p is kept half a sample from 0 and 100%, so that it is never 0 there."""
    edge = 0.5 / samples
    p = min(max(percent / 100, edge), 1.0 - edge)
    return 100 * math.sqrt(p * (1 - p) / samples)


def _samples_for(percent: float, points: float) -> int:
    """The samples that bring the standard error of a percentage near ``percent`` down to ``points``."""
    p = min(max(percent / 100, 0.0), 1.0)
    return max(1, math.ceil(max(p * (1 - p), 1e-4) * (100 / points) ** 2 - 1e-9))
