"""Conv + BatchNorm folding for inference (PTQ).

A BatchNorm in eval mode is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, so
after a convolution it folds into the convolution's weight and bias:

    w' = w * gamma / sqrt(var + eps)        (per output channel)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

Which BatchNorm follows which convolution is read from one forward pass (hooks): a BatchNorm whose input is the
very tensor a Conv1d/2d/3d returned. The folded BatchNorm is replaced by ``nn.Identity`` in its parent. The model's
output on that same input is compared before and after; if folding changed it (the conv's output was also read
elsewhere, say), the fold is undone with a warning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted) by ``module``, in its parent."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def conv_bn_pairs(model: nn.Module, run: Callable[[nn.Module], object]) -> list[tuple[str, str]]:
    """(conv name, batchnorm name) for every BatchNorm fed directly by a convolution, found by ``run(model)``
    (one forward pass). A module called more than once is left out."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []

    def after_conv(module, args, out):
        calls[names[module]] = calls.get(names[module], 0) + 1
        produced[id(out)] = (names[module], out)  # keep the tensor alive so that its id stays unique

    def before_norm(module, args):
        calls[names[module]] = calls.get(names[module], 0) + 1
        hit = produced.get(id(args[0])) if args else None
        if hit is not None and hit[1] is args[0]:
            pairs.append((hit[0], names[module]))

    handles = []
    for m in model.modules():
        if type(m) in _CONVS:
            handles.append(m.register_forward_hook(after_conv))
        elif type(m) in _NORMS:
            handles.append(m.register_forward_pre_hook(before_norm))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return [(c, b) for c, b in pairs if calls.get(c) == 1 and calls.get(b) == 1]


def dead_channels(bn: nn.Module) -> torch.Tensor:
    """The channels whose input the BatchNorm saw constant (running variance ~0, far below ``eps``).

    Folding multiplies such a channel's weights by ``gamma / sqrt(eps)`` (~300x): weights that never mattered (a
    depthwise convolution of an all-zero channel, say) then set a huge per-channel scale, and an integer kernel
    that adds the bias in units of ``s_x * s_w`` rounds the channel's bias to garbage (ONNX Runtime does). The
    BatchNorm's output there is the constant ``beta``, so the fold writes exactly that: zero weights, bias beta."""
    return bn.running_var < DEAD_VARIANCE * bn.eps


DEAD_VARIANCE = 1e-4  # relative to eps: a channel's std below 1% of sqrt(eps)


def folded(bn: nn.Module, conv_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel weight factor ``gamma / sqrt(var + eps)`` and the bias ``(b - mean) * factor + beta`` that
    fold the eval-mode BatchNorm ``bn`` into a convolution with bias ``conv_bias`` (None: zero); see
    :func:`dead_channels` for the channels whose factor is 0."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = torch.where(dead_channels(bn), torch.zeros_like(std), gamma / std)
    bias = conv_bias if conv_bias is not None else torch.zeros_like(bn.running_mean)
    return factor, (bias - bn.running_mean) * factor + beta


def fold_into(conv: nn.Module, bn: nn.Module) -> None:
    """Fold the eval-mode BatchNorm ``bn`` into ``conv`` (in place); see :func:`folded`."""
    with torch.no_grad():
        factor, new_bias = folded(bn, conv.bias)
        conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
        else:
            conv.bias.copy_(new_bias)


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out.float()]
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in _tensors(x)]
    if isinstance(out, dict):
        return [t for k in out for t in _tensors(out[k])]
    return []


def fold_batchnorm(model: nn.Module, run: Callable[[nn.Module], object]) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a convolution into it, in place (the model must be in eval
    mode); ``run(model)`` runs one forward pass. Returns the folded (conv, batchnorm) names."""
    if model.training:
        raise ValueError("fold_batchnorm folds running statistics: call model.eval() first")
    pairs = [(c, b) for c, b in conv_bn_pairs(model, run) if model.get_submodule(b).track_running_stats]
    if not pairs:
        return []
    with torch.no_grad():
        before = run(model)
    saved = {name: copy.deepcopy(model.get_submodule(name)) for pair in pairs for name in pair}
    for conv, bn in pairs:
        fold_into(model.get_submodule(conv), model.get_submodule(bn))
        set_submodule(model, bn, nn.Identity())
    with torch.no_grad():
        after = run(model)
    pairs_out = zip(_tensors(before), _tensors(after), strict=True)
    diff = max(((a - b).abs().max().item() for a, b in pairs_out if a.numel()), default=0)
    magnitude = max((a.abs().max().item() for a in _tensors(before) if a.numel()), default=0)
    if diff > 1e-3 * max(magnitude, 1.0):
        for name, module in saved.items():
            set_submodule(model, name, module)
        warnings.warn(
            "Conv+BatchNorm folding changed the model's output, so it was undone (a convolution's output is "
            "probably read by more than its BatchNorm); the model is quantized unfolded",
            stacklevel=2,
        )
        return []
    return pairs
