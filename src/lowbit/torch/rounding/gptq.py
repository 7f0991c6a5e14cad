"""GPTQ rounding for a quantized PyTorch model: weight codes chosen for the least output error on the data.

    import lowbit.torch as lt
    qmodel = lt.quantize(model, "w4a8", calib=batches, rounding="gptq")   # or, on a quantized model:
    lt.gptq(qmodel, batches)

Plain rounding gives every weight its nearest code. At 4 bits the independent rounding errors of a layer add up
in its output; GPTQ (Frantar et al. 2022; :mod:`lowbit.core.gptq`) rounds one input column at a time and pushes
each column's error onto the columns not yet rounded, weighted by the inverse second moment ``H = E[x x^T]`` of
the layer's input rows (a convolution's input patches), so that the errors cancel on the data the layer sees.

The scales and zero points stay those of plain rounding; only the integer codes change, stored in each weight
quantizer (:meth:`~lowbit.torch.quantizer.TensorQuantizer.set_codes`), so the model's layout, its ONNX export
and its size do not change. The float weights stay as they were: a layer kept in float (mixed precision) runs
its original weight. ``H`` comes from one pass over the calibration data through the float model.

Rounded: the layers of :mod:`lowbit.torch.rounding.roundable`. A layer keeps plain rounding when it saw fewer
than ``ROWS_PER_COLUMN`` input rows per column (``H`` would be poorly known, and GPTQ would fit the calibration
samples), or when ``H`` cannot be inverted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.gptq import DAMP, ROWS_PER_COLUMN, SecondMoment, round_matrix
from lowbit.torch.quantizer import evaluating, param_view
from lowbit.torch.rounding.patches import as_images, conv_patches, is_pointwise, output_positions
from lowbit.torch.rounding.registry import register
from lowbit.torch.rounding.roundable import chosen_layers, groups, weight_matrix
from lowbit.torch.runner import run_data
from lowbit.torch.switches import only

UNFOLD_VALUES = 1 << 24  # unfolded patches held at once while gathering a convolution's H (64 MB of float32)


class LayerMoment:
    """GPTQ's second moment of a layer's input rows (:class:`lowbit.core.gptq.SecondMoment`, accumulated on the
    layer's device), gathered by a forward pre-hook on the layer: rows of a Linear, pixels of a 1x1 convolution,
    input patches otherwise (:func:`~lowbit.torch.rounding.patches.conv_patches`, a bounded number at a time)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.moment = SecondMoment()

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        if isinstance(module, nn.Linear):
            self.moment.add(x.reshape(-1, x.shape[-1]).T[None])  # (groups, columns, rows)
        elif is_pointwise(module, "GPTQ"):
            images = as_images(module, x)
            g, c = groups(module), images.shape[1]
            self.moment.add(images.transpose(0, 1).reshape(g, c // g, -1))  # its rows are pixels
        else:
            per_image = output_positions(module, x[:1], "GPTQ") * groups(module) * module.weight[0].numel()
            chunk = max(1, UNFOLD_VALUES // max(per_image, 1))
            for i in range(0, x.shape[0], chunk):
                rows = conv_patches(module, x[i : i + chunk], "GPTQ")  # (rows, groups, columns)
                self.moment.add(rows.permute(1, 2, 0).contiguous())


def _moments(model: nn.Module, found: dict[str, nn.Module], calib: Any, progress: bool) -> dict[str, LayerMoment]:
    """Every layer's second moment, from one pass of ``calib`` through the float model."""
    moments = {name: LayerMoment(m) for name, m in found.items()}
    hooks = [m.register_forward_pre_hook(moments[name]) for name, m in found.items()]
    try:
        with evaluating(model), torch.no_grad(), only(model, []):
            run_data(model, calib, "GPTQ statistics", progress)
    finally:
        for h in hooks:
            h.remove()
    return moments


def round_layer(module: nn.Module, moment: SecondMoment, damp: float = DAMP) -> bool:
    """Set GPTQ's codes of ``module``'s weight from the second moment of its input rows; False (plain rounding
    kept) when it saw fewer than ``ROWS_PER_COLUMN`` rows per column or ``H`` cannot be inverted."""
    if moment.sum is None or moment.count < ROWS_PER_COLUMN * moment.sum.shape[-1]:
        return False
    q, w = module.weight_quantizer, module.weight.detach()
    scale = param_view(q.scale.detach(), w.shape, q.spec).expand(w.shape)
    zero = param_view(q.zero_point.detach(), w.shape, q.spec).expand(w.shape)
    codes = round_matrix(
        weight_matrix(module, w).cpu().double().numpy(),
        weight_matrix(module, scale).cpu().double().numpy(),
        weight_matrix(module, zero).cpu().double().numpy(),
        q.spec.qmin,
        q.spec.qmax,
        moment.value.cpu().numpy(),
        damp,
    )
    if codes is None:
        return False
    q.set_codes(torch.from_numpy(codes).reshape(w.shape))
    return True


@register("gptq")
def gptq(
    model: nn.Module,
    calib: Iterable[Any],
    *,
    names: Iterable[str] | None = None,
    damp: float = DAMP,
    progress: bool = True,
) -> list[str]:
    """Choose GPTQ codes for the weights of ``model``'s quantized ``Conv``/``Linear`` layers (all of them, or
    those in ``names``) from the inputs they see on ``calib`` (batches, as :func:`lowbit.torch.quantize` takes
    them, or a forward loop ``calib(model)``). Returns the names of the layers rounded; the others keep plain
    rounding. Call it after calibration; it runs the model in float, in eval mode, without gradients."""
    found = chosen_layers(model, names, "GPTQ")
    if not found:
        return []
    moments = _moments(model, found, calib, progress)
    bar = tqdm(moments.items(), desc="GPTQ rounding", unit="layer", disable=not progress, leave=False)
    return [name for name, m in bar if round_layer(m.module, m.moment, damp)]
