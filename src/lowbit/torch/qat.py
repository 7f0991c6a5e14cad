"""Conv+BatchNorm for quantization-aware training: the BatchNorm keeps training while the convolution computes
with the folded, quantized weight that inference will use.

Folding a BatchNorm before QAT (as PTQ does) freezes its statistics: the network then trains without batch
normalisation, and its folded weights drift from what a BatchNorm would give. :class:`QuantConvBn2d` (1d, 3d)
keeps the BatchNorm and simulates the fold instead (Jacob et al. 2018; Krishnamoorthi 2018, section 3.2):

    f = gamma / sqrt(running_var + eps)                      (per output channel)
    training:   y = bn( conv(q(x), q_w(w * f)) / f + b )     bn normalises with the batch statistics and
                                                             updates its running ones
    inference:  y = conv(q(x), q_w(w * f)) + beta + (b - running_mean) * f

so the quantizer always sees the folded weight that the exported model carries, the BatchNorm's running
statistics stay those of the convolution's real output, and in eval mode (and in the exported ONNX model) the
layer is exactly the folded convolution. :func:`freeze_bn_stats` switches the BatchNorms to their running
statistics for the last steps of training, as Krishnamoorthi recommends.

Training normalises with the batch statistics, inference with the running ones: until these have converged (a
freshly initialised model, or data unlike the pretraining data) the activations of training are not those of
inference. :func:`batch_statistics` runs a model as training will see it, so that :func:`lowbit.torch.quantize`
with ``qat=True`` calibrates the activation ranges on what training feeds them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lowbit.core.formats import scales_itself
from lowbit.recipe import Config
from lowbit.torch.fold import fold_batchnorm, folded, set_submodule
from lowbit.torch.layers import QuantConv1d, QuantConv2d, QuantConv3d


class _ConvBn:
    """The simulated fold over a ``Quant*Conv`` parent class; ``bn`` is the BatchNorm it folds.

    The weight quantizer sees the folded weight ``w * f``, and ``f`` moves in training with the BatchNorm's running
    variance and its ``gamma``: from statistics that have not converged, a range fixed at quantize time would clip
    the whole folded weight once the variance settles (and the gradient stops at clipped weights). With
    ``follow_bn`` (default) the range moves with ``f`` in training: per output channel, the calibrated range times
    ``f / f_calibrated``. The weight's own changes do not move it (see ``TensorQuantizer.follow_weight``).
    """

    bn: nn.modules.batchnorm._BatchNorm
    bn_frozen: bool = False  # use (and keep) the running statistics in training too
    follow_bn: bool = True
    _calibration: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # f, lo, hi when calibrated

    def calibrate_weight(self) -> None:
        super().calibrate_weight()
        q = self.weight_quantizer
        self._calibration = None
        if not self.weight_float and q.calibrated and not q.dynamic and not scales_itself(q.spec):  # binary, ternary
            with torch.no_grad():  # take their scale from the folded weight itself: nothing to follow
                f, _ = folded(self.bn, None)
                self._calibration = (f.detach().clone(), *q.real_range())

    def _follow_fold(self, f: torch.Tensor) -> None:
        """The weight range, as calibrated, times each channel's ``f / f_calibrated`` (a per-tensor range: the
        largest such factor)."""
        q = self.weight_quantizer
        f0, lo, hi = (t.to(f.device) for t in self._calibration)
        with torch.no_grad():
            r = torch.where(f0 != 0, f / torch.where(f0 != 0, f0, torch.ones_like(f0)), torch.ones_like(f0))
            if q.spec.axis is None or q.spec.axis != 0:
                r = r.abs().max()
            else:
                r = r.reshape(-1, *([1] * (lo.dim() - 1)))
            new_lo, new_hi = torch.minimum(lo * r, hi * r), torch.maximum(lo * r, hi * r)
        q.set_range(new_lo.cpu().numpy(), new_hi.cpu().numpy())

    @classmethod
    def from_conv_bn(cls, conv: nn.Module, bn: nn.Module, cfg, name: str = ""):
        new = cls.from_float(conv, cfg, name)
        new.bn = bn
        new.bn.train(new.training)
        return new

    def _weight_to_quantize(self) -> torch.Tensor:
        f, _ = folded(self.bn, None)
        return self.weight * f.reshape(-1, *([1] * (self.weight.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, bias = folded(self.bn, self.bias)  # f = 0 for a dead channel: see lowbit.torch.fold.dead_channels
        q = self.weight_quantizer
        # Only in training proper: calibrating on batch statistics switches this module, not its quantizers.
        if self.training and q.training and self.follow_bn and self._calibration is not None and not q.learn_scale:
            self._follow_fold(f.detach())
        w = self.weight_quantizer(self.weight * f.reshape(-1, *([1] * (self.weight.dim() - 1))))
        x = self.input_quantizer(x)
        if self.training and not self.bn_frozen:
            y = self._conv_forward(x, w, None)
            channel = (1, -1, *([1] * (y.dim() - 2)))
            y = y / torch.where(f == 0, torch.ones_like(f), f).reshape(channel)  # dead channels: y = 0
            if self.bias is not None:
                y = y + self.bias.reshape(channel)
            return self.bn(y)
        return self._conv_forward(x, w, self._bias(bias))


class QuantConvBn1d(_ConvBn, QuantConv1d):
    pass


class QuantConvBn2d(_ConvBn, QuantConv2d):
    pass


class QuantConvBn3d(_ConvBn, QuantConv3d):
    pass


CONV_BN_MAP = {nn.Conv1d: QuantConvBn1d, nn.Conv2d: QuantConvBn2d, nn.Conv3d: QuantConvBn3d}


def prepare_conv_bn(model: nn.Module, config: Config, run: Callable[[nn.Module], object]) -> list[tuple[str, str]]:
    """Replace every Conv+BatchNorm pair that folding would fold (checked on a copy of ``model``, by
    :func:`~lowbit.torch.fold.fold_batchnorm`) and whose convolution ``config`` quantizes by one
    :class:`QuantConvBn2d` (1d, 3d), in place; the BatchNorm's slot becomes ``nn.Identity``. Returns the pairs."""
    pairs = fold_batchnorm(copy.deepcopy(model), run)
    done = []
    for conv_name, bn_name in pairs:
        layer = config.for_layer(conv_name)
        if layer is None:
            continue
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        new = CONV_BN_MAP[type(conv)].from_conv_bn(conv, bn, layer, conv_name)
        new.calibrate_weight()
        set_submodule(model, conv_name, new)
        set_submodule(model, bn_name, nn.Identity())
        done.append((conv_name, bn_name))
    return done


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> int:
    """Make every QuantConvBn layer of ``model`` compute with its BatchNorm's running statistics (and stop
    updating them) in training mode too, or undo that (``frozen=False``); returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, _ConvBn)]
    for m in layers:
        m.bn_frozen = frozen
    return len(layers)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with every BatchNorm of ``model`` (plain, or kept by a :class:`QuantConvBn2d` (1d, 3d) whose
    statistics are not frozen) normalising with the statistics of each batch, as in training; everything else
    keeps its mode (Dropout stays off in eval mode). The running statistics, and every mode, are restored after.

    >>> with batch_statistics(qmodel.eval()):  # doctest: +SKIP
    ...     lowbit.torch.calibrate(qmodel, batches)
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    layers = [m for m in model.modules() if isinstance(m, _ConvBn) and not m.bn_frozen]
    frozen = {id(m.bn) for m in model.modules() if isinstance(m, _ConvBn) and m.bn_frozen}
    switched = [m for m in [*bns, *layers] if id(m) not in frozen]
    modes = [m.training for m in switched]
    saved = [{k: b.clone() for k, b in bn.named_buffers(recurse=False)} for bn in bns]
    try:
        for m in switched:
            m.training = True  # this module only: its quantizers keep their own mode
        yield model
    finally:
        for m, was in zip(switched, modes, strict=True):
            m.training = was
        with torch.no_grad():
            for bn, buffers in zip(bns, saved, strict=True):
                for k, b in buffers.items():
                    getattr(bn, k).copy_(b)
