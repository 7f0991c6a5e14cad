"""The input patch each output position of a convolution reads: one helper for both weight roundings (GPTQ's
second moment takes every position, AdaRound's samples chosen ones).

A ``Conv1d`` is treated as a 1-pixel-high ``Conv2d``. A patch is laid out in the weight's (in-channel, taps) order,
so that ``patch @ weight_row`` is the layer's output there (:func:`lowbit.torch.rounding.roundable.weight_matrix`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import CalibrationError


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


def as_images(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input as (N, C, H, W): a Conv1d's gets a height of 1."""
    return x.unsqueeze(-2) if isinstance(module, nn.Conv1d) else x


def conv_patches(
    module: nn.Module, x: torch.Tensor, method: str, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The input patch each output position of a Conv1d/Conv2d reads, as (rows, groups, columns) in the weight's
    (in-channel, taps) order, zero where a patch reaches into the padding: at every position (``positions`` None,
    by ``F.unfold``), or at ``positions`` (flat indices over images x output rows x output columns, gathered).
    ``method`` names the rounding in the error :func:`conv_geometry` may raise."""
    x = as_images(module, x)
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
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv_geometry(module, method)
    n, _, h, w = as_images(module, x).shape
    return n * ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def is_pointwise(module: nn.Module, method: str) -> bool:
    """A 1x1 convolution with stride 1 and no padding: its input rows are its input pixels, no patches needed."""
    kernel, stride, padding, _ = conv_geometry(module, method)
    return all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(padding)
