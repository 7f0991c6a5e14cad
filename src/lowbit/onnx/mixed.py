"""Automatic mixed precision: keep the most sensitive layers in float, fewest first, until a metric is in budget.

Layers come ranked by their own sensitivity (:func:`lowbit.onnx.analyze.layer_sensitivity`: the model's output
error with only that layer quantized). The search builds the model with the first k of them in float for
k = 0, 1, 2, ... (from one calibration, :class:`lowbit.onnx.calibrated.Calibrated`), scores each with the metric
and stops at the first k whose drop from FP32 is within ``max_drop``. Each step records the score, so the
result is also the curve "metric vs number of layers kept in float".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from lowbit._table import format_table
from lowbit.onnx.calibrated import Calibrated
from lowbit.onnx.metrics import Metric
from lowbit.onnx.model import session


@dataclass
class Step:
    """The model with ``kept`` layers in float (the last one added last) and its score."""

    kept: int
    layer: str | None
    score: float
    drop: float


@dataclass
class MixedResult:
    metric: str
    unit: str
    reference: float
    max_drop: float
    steps: list[Step] = field(default_factory=list)
    met: bool = False

    @property
    def kept(self) -> list[str]:
        """The layers kept in float by the last step."""
        return [s.layer for s in self.steps[1 : self.steps[-1].kept + 1] if s.layer is not None]

    def table(self) -> str:
        rows = []
        for prev, s in zip([None, *self.steps], self.steps, strict=False):
            gain = "" if prev is None else f"{s.score - prev.score:+.4g}"
            rows.append([s.kept, s.layer or "(all quantized)", f"{s.score:.4f}", f"{s.drop:.4f}", gain])
        verdict = (
            f"within budget with {self.steps[-1].kept} layer(s) in float"
            if self.met
            else f"budget not met with {self.steps[-1].kept} layer(s) in float"
        )
        head = (
            f"mixed precision: {self.metric} FP32 {self.reference:.4f}{self.unit}, budget: drop <= {self.max_drop}"
            f"{self.unit}; {verdict}"
        )
        return head + "\n" + format_table(["kept", "layer kept in float", "score", "drop", "gain"], rows, "rlrrr")

    def to_dict(self) -> dict:
        return {**asdict(self), "kept": self.kept}


def search(
    calibrated: Calibrated,
    ranked: Sequence[str],
    metric: Metric,
    max_drop: float,
    *,
    max_float: int | None = None,
    progress: bool = True,
) -> MixedResult:
    """Keep ``ranked`` layers (most sensitive first) in float one more at a time until ``metric`` drops by at
    most ``max_drop`` from FP32; at most ``max_float`` layers (default: all)."""
    reference = metric.prepare(session(calibrated.float_model))
    result = MixedResult(metric.name, metric.unit, reference, float(max_drop))
    limit = len(ranked) if max_float is None else min(max_float, len(ranked))
    bar = tqdm(total=limit + 1, desc="mixed precision", unit="model", disable=not progress)
    for k in range(limit + 1):
        model = calibrated.build(keep_float=ranked[:k]).model
        score = metric.score(session(model))
        drop = metric.drop(score)
        result.steps.append(Step(k, ranked[k - 1] if k else None, score, drop))
        bar.update(1)
        bar.set_postfix_str(f"{metric.name} {score:.4f}")
        if drop <= max_drop:
            result.met = True
            break
    bar.close()
    return result
