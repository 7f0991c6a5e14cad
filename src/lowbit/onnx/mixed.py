"""Automatic mixed precision: keep the most sensitive layers in float, fewest first, until a metric is in budget.

Layers come ranked by their own sensitivity (:func:`lowbit.onnx.analyze.layer_sensitivity`: the model's output
error with only that layer quantized). The search builds the model with the first k of them in float for
k = 0, 1, 2, ... (from one calibration, :class:`lowbit.onnx.calibration.Calibrated`), scores each with the metric
and stops at the first k whose drop from FP32 is within ``max_drop``. Each step records the score, so the
result is also the curve "metric vs number of layers kept in float".
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from lowbit.analysis import MixedResult, Step
from lowbit.onnx.calibration import Calibrated
from lowbit.onnx.metrics import Metric
from lowbit.onnx.model import session


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
    result = MixedResult(metric.name, metric.unit, reference, float(max_drop), samples=metric.samples)
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
