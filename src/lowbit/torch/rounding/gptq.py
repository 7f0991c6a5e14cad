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

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.gptq import DAMP, ROWS_PER_COLUMN, SecondMoment, round_groups, round_matrix
from lowbit.recipe import Config
from lowbit.torch import distributed
from lowbit.torch.blockwise import Data, Process, in_blocks
from lowbit.torch.quantizer import param_view
from lowbit.torch.rounding.patches import as_images, conv_patches, is_pointwise, output_positions
from lowbit.torch.rounding.registry import register
from lowbit.torch.rounding.roundable import chosen_layers, groups, weight_matrix
from lowbit.torch.smoothing import fresh

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


def moments(layers: dict[str, nn.Module], data: Data) -> dict[str, LayerMoment]:
    """Every layer's second moment, from ``data.run()`` (a float pass)."""
    found = {name: LayerMoment(m) for name, m in layers.items()}
    hooks = [m.register_forward_pre_hook(found[name]) for name, m in layers.items()]
    try:
        data.run()
    finally:
        for h in hooks:
            h.remove()
    for m in found.values():  # under torch.distributed: every rank's rows (a no-op in one process)
        distributed.reduce_moment(m.moment)
    return found


def _fit_groups(q) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``block (1, rows, group_size) -> (scale, zero_point)``, each (1, rows, 1): the range the weight quantizer
    ``q`` (its spec and method) fits to the block's weights as GPTQ has updated them."""

    def fit(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probe = fresh(q)
        probe.calibrate_on(torch.from_numpy(np.ascontiguousarray(block[0], dtype=np.float32)))
        return probe.scale.double().numpy()[None], probe.zero_point.double().numpy()[None]

    return fit


def _fits_as_it_goes(module: nn.Module, act_order: bool) -> bool:
    """Per-group Linear weights without act-order take their group scales as GPTQ goes (static otherwise)."""
    g = module.weight_quantizer.spec.group_size
    return isinstance(module, nn.Linear) and g is not None and not act_order and module.in_features % g == 0


def round_layer(module: nn.Module, moment: SecondMoment, damp: float = DAMP, act_order: bool = False) -> bool:
    """Set GPTQ's codes of ``module``'s weight from the second moment of its input rows; False (plain rounding
    kept) when it saw fewer than ``ROWS_PER_COLUMN`` rows per column or ``H`` cannot be inverted. ``act_order``:
    the columns in order of decreasing ``diag(H)``, at the scales calibration gave. Per-group weights of a Linear
    without ``act_order``: each group's scale and zero point are fitted (by the quantizer's own method) to the
    group's weights as updated when GPTQ reaches it (:func:`lowbit.core.gptq.round_groups`) and stored in the
    weight quantizer with the codes."""
    if moment.sum is None or moment.count < ROWS_PER_COLUMN * moment.sum.shape[-1]:
        return False
    q, w = module.weight_quantizer, module.weight.detach()
    h = moment.value.cpu().numpy()
    if _fits_as_it_goes(module, act_order):
        w64 = w.cpu().double().numpy()[None]
        found = round_groups(w64, q.spec.group_size, _fit_groups(q), q.spec.qmin, q.spec.qmax, h, damp)
        if found is None:
            return False
        codes, scale, zero = found
        q.set_qparams(scale[0].astype(np.float32), zero[0])
        q.set_codes(torch.from_numpy(codes[0]).round().to(torch.int32))
        return True
    scale = param_view(q.scale.detach(), w.shape, q.spec).expand(w.shape)
    zero = param_view(q.zero_point.detach(), w.shape, q.spec).expand(w.shape)
    codes = round_matrix(
        weight_matrix(module, w).cpu().double().numpy(),
        weight_matrix(module, scale).cpu().double().numpy(),
        weight_matrix(module, zero).cpu().double().numpy(),
        q.spec.qmin,
        q.spec.qmax,
        h,
        damp,
        act_order=act_order,
    )
    if codes is None:
        return False
    q.set_codes(torch.from_numpy(codes).reshape(w.shape))
    return True


def rounder(damp: float = DAMP, act_order: bool = False, progress: bool = True) -> Process:
    """GPTQ as a stage of :func:`lowbit.torch.blockwise.in_blocks`: the layers' second moments from one pass of
    their data, then each layer rounded; returns the names of the layers rounded."""

    def process(layers: dict[str, nn.Module], data: Data) -> list[str]:
        found = moments(layers, data)
        bar = tqdm(found.items(), desc="GPTQ rounding", unit="layer", disable=not progress, leave=False)
        done = [name for name, m in bar if round_layer(m.module, m.moment, damp, act_order)]
        found.clear()  # the next block's statistics replace these
        return done

    return process


def _options(config: Config) -> dict[str, Any]:
    return {"act_order": config.act_order, "blocks": None if config.blockwise else False}


@register("gptq", options=_options)
def gptq(
    model: nn.Module,
    calib: Iterable[Any],
    *,
    names: Iterable[str] | None = None,
    damp: float = DAMP,
    act_order: bool = False,
    blocks: Sequence[str] | bool | None = None,
    quantized_inputs: bool = True,
    progress: bool = True,
) -> list[str]:
    """Choose GPTQ codes for the weights of ``model``'s quantized ``Conv``/``Linear`` layers (all of them, or
    those in ``names``) from the inputs they see on ``calib`` (batches, as :func:`lowbit.torch.quantize` takes
    them, or a forward loop ``calib(model)``). Returns the names of the layers rounded; the others keep plain
    rounding. Call it after calibration; it runs the model in eval mode, without gradients.

    ``act_order``: columns by decreasing input energy (static group scales). ``blocks`` (default: found):
    block by block over the model's repeated blocks (:mod:`lowbit.torch.blockwise`; False: one pass of the float
    model); ``quantized_inputs``: each block's statistics are gathered on the output of the blocks before it as
    rounded (the GPTQ paper's sequential setting; False: the float model's, which gives the codes of one pass)."""
    found = chosen_layers(model, names, "GPTQ")
    if not found:
        return []
    process = rounder(damp, act_order, progress)
    return in_blocks(
        model, calib, found, process, blocks=blocks, quantized_inputs=quantized_inputs, desc="GPTQ", progress=progress
    )
