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

Rounded: ``Conv1d``/``Conv2d`` (zero padding, any groups) and ``Linear`` layers whose weight quantizer is static
and calibrated. A layer keeps plain rounding when it saw fewer than ``ROWS_PER_COLUMN`` input rows per column
(``H`` would be poorly known, and GPTQ would fit the calibration samples), or when ``H`` cannot be inverted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.gptq import DAMP, ROWS_PER_COLUMN, SecondMoment, round_matrix
from lowbit.errors import CalibrationError
from lowbit.torch.layers import QuantMixin
from lowbit.torch.quantizer import evaluating, param_view
from lowbit.torch.runner import run_data
from lowbit.torch.switches import only

UNFOLD_VALUES = 1 << 24  # unfolded patches held at once while gathering a convolution's H (64 MB of float32)


def _roundable(module: nn.Module) -> bool:
    if not isinstance(module, QuantMixin) or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        return False
    if type(module)._weight_to_quantize is not QuantMixin._weight_to_quantize:  # e.g. a conv with its BN folded
        return False
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode != "zeros":
        return False
    q = module.weight_quantizer
    return q.mode == "quantize" and q.calibrated and not q.dynamic


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` GPTQ can round, by name."""
    return {name: m for name, m in model.named_modules() if _roundable(m)}


def chosen_layers(model: nn.Module, names: Iterable[str] | None, method: str) -> dict[str, nn.Module]:
    """The roundable layers of ``model`` named in ``names`` (all of them when None), in that order; a name that is
    not one is an error that lists the roundable ones. ``method`` names the rounding in the message."""
    found = layers(model)
    if names is None:
        return found
    wanted = list(names)
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise CalibrationError(
            f"{method} cannot round {', '.join(unknown[:5])}: not a calibrated, statically quantized Conv1d/Conv2d/"
            f"Linear layer of this model. Roundable layers: {', '.join(list(found)[:8]) or 'none'}"
        )
    return {n: found[n] for n in wanted}


def _groups(module: nn.Module) -> int:
    return module.groups if isinstance(module, nn.Conv1d | nn.Conv2d) else 1


def weight_matrix(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor of the weight's shape as (groups, rows, columns): a row per output channel, a column per input
    feature (a conv's (in-channel, taps), in the weight's order)."""
    g = _groups(module)
    return t.reshape(g, t.shape[0] // g, -1)


def conv_geometry(module: nn.Module, method: str) -> tuple[tuple[int, ...], ...]:
    """(kernel, stride, padding, dilation) of a Conv1d/Conv2d as 2-D tuples (a Conv1d is a 1-pixel-high Conv2d),
    with ``padding="same"``/``"valid"`` turned into the padding torch computes. ``method`` names the rounding in
    the error for ``"same"`` with an even kernel, whose padding is not symmetric."""
    if isinstance(module, nn.Conv1d):
        k, s, d = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        p = module.padding if isinstance(module.padding, str) else (0, *module.padding)
    else:
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
    if p == "valid":
        p = (0, 0)
    elif p == "same":
        if any(dd * (kk - 1) % 2 for kk, dd in zip(k, d, strict=True)):
            raise CalibrationError(f"{method} cannot follow padding='same' with an even kernel; use explicit padding")
        p = tuple(dd * (kk - 1) // 2 for kk, dd in zip(k, d, strict=True))
    return tuple(k), tuple(s), tuple(p), tuple(d)


def conv_patches(
    module: nn.Module, x: torch.Tensor, method: str, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The input patch each output position of a Conv1d/Conv2d reads, as (rows, groups, columns) in the weight's
    (in-channel, taps) order, zero where a patch reaches into the padding: at every position (``positions`` None,
    by ``F.unfold``), or at ``positions`` (flat indices over images x output rows x output columns, gathered).
    ``method`` names the rounding in the error :func:`conv_geometry` may raise."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
    kernel, stride, padding, dilation = conv_geometry(module, method)
    if positions is None:
        u = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*taps, L)
        return u.transpose(1, 2).reshape(-1, module.groups, u.shape[1] // module.groups)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    _, _, h, w = x.shape
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    img, rest = positions // (oh * ow), positions % (oh * ow)
    rows = (rest // ow)[:, None] * sh - ph + torch.arange(kh, device=x.device)[None] * dh  # (R, kh)
    cols = (rest % ow)[:, None] * sw - pw + torch.arange(kw, device=x.device)[None] * dw  # (R, kw)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # not padding
    p = x[img[:, None, None], :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    p = p * inside[..., None]  # (R, kh, kw, C)
    p = p.permute(0, 3, 1, 2).reshape(len(positions), -1)  # (R, C*kh*kw)
    return p.reshape(len(positions), module.groups, -1)


def output_positions(module: nn.Module, x: torch.Tensor, method: str) -> int:
    """How many output positions (images x rows x columns) a Conv1d/Conv2d computes on ``x``."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv_geometry(module, method)
    n, _, h, w = x.shape
    return n * ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


class LayerMoment:
    """GPTQ's second moment of a layer's input rows (:class:`lowbit.core.gptq.SecondMoment`), gathered by a
    forward pre-hook on the layer: rows of a Linear, pixels of a 1x1 convolution, unfolded patches otherwise."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.moment = SecondMoment()

    def _add(self, rows: torch.Tensor) -> None:  # rows: (groups, columns, n)
        self.moment.add(rows)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        g = _groups(module)
        if isinstance(module, nn.Linear):
            self._add(x.reshape(-1, x.shape[-1]).T[None])
            return
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-2)
        kernel, stride, padding, dilation = conv_geometry(module, "GPTQ")
        n, c = x.shape[:2]
        if all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(np.ravel(padding)):
            pixels = x.transpose(0, 1).reshape(g, c // g, -1)  # a 1x1 convolution: its rows are pixels
            self._add(pixels)
            return
        per_image = F.unfold(x[:1], kernel, dilation=dilation, padding=padding, stride=stride).numel()
        chunk = max(1, UNFOLD_VALUES // max(per_image, 1))
        for i in range(0, n, chunk):
            rows = conv_patches(module, args[0].detach().float()[i : i + chunk], "GPTQ")  # (rows, groups, columns)
            self._add(rows.permute(1, 2, 0).contiguous())


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
    moments = {name: LayerMoment(m) for name, m in found.items()}
    hooks = [m.register_forward_pre_hook(moments[name]) for name, m in found.items()]
    try:
        with evaluating(model), torch.no_grad(), only(model, []):
            run_data(model, calib, "GPTQ statistics", progress)
    finally:
        for h in hooks:
            h.remove()
    rounded = []
    for name, moment in tqdm(moments.items(), desc="GPTQ rounding", unit="layer", disable=not progress, leave=False):
        module, q = moment.module, moment.module.weight_quantizer
        h = moment.moment
        if h.sum is None or h.count < ROWS_PER_COLUMN * h.sum.shape[-1]:
            continue
        w = module.weight.detach()
        scale = param_view(q.scale.detach(), w.shape, q.spec).expand(w.shape)
        zero = param_view(q.zero_point.detach(), w.shape, q.spec).expand(w.shape)
        codes = round_matrix(
            weight_matrix(module, w).cpu().double().numpy(),
            weight_matrix(module, scale).cpu().double().numpy(),
            weight_matrix(module, zero).cpu().double().numpy(),
            q.spec.qmin,
            q.spec.qmax,
            h.value.cpu().numpy(),
            damp,
        )
        if codes is None:
            continue
        q.set_codes(torch.from_numpy(codes).reshape(w.shape))
        rounded.append(name)
    return rounded
