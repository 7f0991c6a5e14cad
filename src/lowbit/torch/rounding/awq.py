"""AWQ: activation-aware weight scaling before rounding (Lin et al. 2023), for weight-only INT4 and the like.

    import lowbit.torch as lt
    qmodel = lt.quantize(model, "w4a16_group128", calib=batches, rounding="awq")   # or "awq+gptq"

A few input channels of a transformer's Linear layers carry large activations, and the weights that read them
matter most to the output. Scaling those weight columns up by ``s_j`` before rounding (``W * s``) gives them a
finer relative grid, and dividing the input by ``s`` keeps the float function: ``y = (x / s) (W * s)^T``.
For each group of Linear layers reading one tensor (q, k and v after a LayerNorm), ``s = m^a`` (normalised) with
``m`` the input's per-column mean |x| over the calibration data and ``a`` on a grid in [0, 1), chosen for the least
output error of the group on a seeded sample of input rows after the layers' *own* weight quantization (their
TensorQuantizer: bits, per channel or group, symmetric or not, range method), by
:func:`lowbit.core.smoothing.search_scales` (``a = 0`` is plain rounding, so on those rows it is never worse).
``1 / s`` is folded into the LayerNorm or Linear that writes the input when only the group reads it, else kept as
a per-column ``Mul`` before the layer (:class:`lowbit.torch.smoothing.SmoothedLinear`); the weight quantizers are
then fitted again to the scaled weights, whose codes are plain rounding's (``"awq"``) or GPTQ's (``"awq+gptq"``,
which gathers its statistics after the scaling, block by block with the quantized blocks upstream).

Statistics are gathered block by block where the model has repeated blocks (:mod:`lowbit.torch.blockwise`; AWQ's
search reads float inputs, as one pass over the float model would, so the scales are the same either way).
Static input quantizers of the scaled layers (W4A8) are calibrated again afterwards: their inputs changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from lowbit.core.gptq import DAMP
from lowbit.core.smoothing import GRID, search_scales
from lowbit.errors import CalibrationError
from lowbit.recipe import Config
from lowbit.torch.blockwise import Data, Process, in_blocks
from lowbit.torch.rounding.gptq import rounder
from lowbit.torch.rounding.registry import register
from lowbit.torch.rounding.roundable import named_subset
from lowbit.torch.smoothing import (
    ROWS,
    PerMatrix,
    apply_scales,
    gather,
    input_groups,
    recalibrate_inputs,
    smoothable,
    warn_unsmoothed,
    weights,
)


def scaler(model: nn.Module, results: dict[str, float], rows: int = ROWS, grid: int = GRID) -> Process:
    """AWQ as a stage of :func:`lowbit.torch.blockwise.in_blocks`: the groups of the layers given, their input
    statistics from one pass of their data, then each group's scales searched and applied. ``results`` gets,
    per group (by its first layer), the output error on the sampled rows relative to plain rounding's."""

    def process(layers: dict[str, nn.Module], data: Data) -> list[str]:
        groups = input_groups(model, layers, data.run_first)
        found = gather(groups, data, rows)
        for g, st in zip(groups, found, strict=True):
            r = search_scales(weights(g), st.sample.value, PerMatrix(g.layers), st.stats.mean_abs, grid)
            apply_scales(model, g, r.scales)
            results[g.names[0]] = r.error / r.plain_error if r.plain_error > 0 else 1.0
        return [n for g in groups for n in g.names]

    return process


def _layers(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Module]:
    found = {n: m for n, m in model.named_modules() if smoothable(m)}
    warn_unsmoothed(model, "AWQ")
    kind = "a QuantLinear with a calibrated static integer weight quantizer"
    return named_subset(found, names, "AWQ cannot scale", kind, "Scalable")


def _options(config: Config) -> dict[str, Any]:
    return {"blocks": None if config.blockwise else False}


def _gptq_options(config: Config) -> dict[str, Any]:
    return {**_options(config), "act_order": config.act_order}


@register("awq", batches_only=True, options=_options, scales_weights=True)
def awq(
    model: nn.Module,
    calib: Iterable[Any],
    *,
    names: Iterable[str] | None = None,
    blocks: Sequence[str] | bool | None = None,
    rows: int = ROWS,
    grid: int = GRID,
    progress: bool = True,
) -> dict[str, float]:
    """Scale ``model``'s quantized Linear layers (all, or those in ``names``) by AWQ (see the module doc) from
    calibration batches ``calib``, then leave them plain rounding. ``rows``: input rows sampled per group for the
    search; ``grid``: exponents searched; ``blocks``: :func:`lowbit.torch.blockwise.in_blocks`. Returns, per group
    (by its first layer), its output error on the sampled rows divided by plain rounding's (at most 1)."""
    if rows < 1 or grid < 1:
        raise CalibrationError(f"AWQ needs rows >= 1 and grid >= 1, got {rows} and {grid}")
    layers = _layers(model, names)
    results: dict[str, float] = {}
    if not layers:
        return results
    done = in_blocks(
        model, calib, layers, scaler(model, results, rows, grid), blocks=blocks, quantized_inputs=False,
        desc="AWQ", progress=progress,
    )  # fmt: skip
    recalibrate_inputs(model, calib, [model.get_submodule(n) for n in done], progress)
    return results


@register("awq+gptq", batches_only=True, options=_gptq_options, scales_weights=True)
def awq_gptq(
    model: nn.Module,
    calib: Iterable[Any],
    *,
    names: Iterable[str] | None = None,
    blocks: Sequence[str] | bool | None = None,
    act_order: bool = False,
    damp: float = DAMP,
    rows: int = ROWS,
    grid: int = GRID,
    progress: bool = True,
) -> dict[str, float]:
    """AWQ's scales, then GPTQ's codes (:mod:`lowbit.torch.rounding.gptq`) for the scaled weights, part by part:
    each block is scaled, then its second moments gathered (on the scaled inputs) and its layers rounded, and the
    next block reads this one's quantized output. Returns what :func:`awq` returns."""
    layers = _layers(model, names)
    results: dict[str, float] = {}
    if not layers:
        return results
    scale, rounding = scaler(model, results, rows, grid), rounder(damp, act_order, progress)

    def process(part: dict[str, nn.Module], data: Data) -> list[str]:
        done = scale(part, data)
        rounding({n: model.get_submodule(n) for n in part}, data)  # scaling may have swapped a layer
        return done

    done = in_blocks(model, calib, layers, process, blocks=blocks, desc="AWQ+GPTQ", progress=progress)
    recalibrate_inputs(model, calib, [model.get_submodule(n) for n in done], progress)
    return results
