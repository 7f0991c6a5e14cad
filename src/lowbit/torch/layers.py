"""Quantized layers: the torch layer with a :class:`TensorQuantizer` on its input and one on its weight.

Each ``Quant*`` class subclasses the float layer it replaces (so ``isinstance(m, nn.Conv2d)`` still holds) and is
built from it by :meth:`from_float`, which shares nothing with the original. :data:`MODULE_MAP` says which layer
becomes which; :func:`lowbit.torch.quantize` swaps modules with it explicitly, by name, in their parents.

Weights are quantized per output channel along the axis each layer stores it on (Conv: 0, ConvTranspose: 1,
Linear: 0), in groups along the input axis (1) for per-group configs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.torch.config import LayerConfig, QuantizerConfig
from lowbit.torch.quantizer import TensorQuantizer


def _quantizer(cfg: QuantizerConfig | None, axis: int, name: str) -> TensorQuantizer:
    if cfg is None:
        q = TensorQuantizer(QuantizerConfig().spec(None), name=name)
        q.mode = "disabled"
        return q
    return TensorQuantizer(
        cfg.spec(axis),
        method=cfg.method,
        method_options=cfg.method_options,
        dynamic=cfg.dynamic,
        learn_scale=cfg.learn_scale,
        name=name,
    )


class QuantMixin:
    """``input_quantizer`` and ``weight_quantizer`` on a layer with a ``weight``."""

    WEIGHT_AXIS = 0
    GROUP_AXIS = 1

    input_quantizer: TensorQuantizer
    weight_quantizer: TensorQuantizer

    def _init_quantizers(self, cfg: LayerConfig, name: str) -> None:
        self.input_quantizer = _quantizer(cfg.input, 1, f"{name}.input")
        w = cfg.weight
        if w is not None and w.dynamic:  # weights are constants: "dynamic" means nothing for them
            w = replace(w, dynamic=False)
        axis = self.GROUP_AXIS if w is not None and w.granularity == "group" else self.WEIGHT_AXIS
        self.weight_quantizer = _quantizer(w, axis, f"{name}.weight")
        self.weight_quantizer.is_weight = True
        self.weight_float = w is None

    @classmethod
    def _hyper(cls, module: nn.Module) -> dict:
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "groups": module.groups,
            "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }

    @classmethod
    def from_float(cls, module: nn.Module, cfg: LayerConfig, name: str = ""):
        """A quantized copy of the float layer ``module`` (same weights, on the same device; quantizers
        uncalibrated)."""
        new = cls(**cls._hyper(module), device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(module.weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        new.train(module.training)
        new._init_quantizers(cfg, name)
        return new.to(module.weight.device)

    def calibrate_weight(self) -> None:
        """Fix the weight's scale from the weight itself (max |w| per channel or group): no data needed."""
        if self.weight_float:
            return
        q = self.weight_quantizer
        q.mode = "calibrate"
        with torch.no_grad():
            q(self._weight_to_quantize())
        q.load_calibration()

    def _weight_to_quantize(self) -> torch.Tensor:
        return self.weight


class QuantConv1d(QuantMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv3d(QuantMixin, nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConvTranspose2d(QuantMixin, nn.ConvTranspose2d):
    WEIGHT_AXIS = 1  # (in, out / groups, kH, kW)
    GROUP_AXIS = 0

    @classmethod
    def _hyper(cls, module: nn.Module) -> dict:
        return {**super()._hyper(module), "output_padding": module.output_padding}

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return F.conv_transpose2d(
            self.input_quantizer(x),
            self.weight_quantizer(self.weight),
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )


class QuantLinear(QuantMixin, nn.Linear):
    @classmethod
    def _hyper(cls, module: nn.Module) -> dict:
        return {"in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class Add(nn.Module):
    """``a + b`` as a module, so that quantization can reach the inputs of an addition.

    ``quantize`` says which operands a quantized copy (:class:`QuantAdd`) quantizes. The default, the second,
    is TensorRT's rule for a residual ``out + skip``: with its skip input quantized, TensorRT runs the add inside
    the INT8 convolution that produces ``out``. Write ``self.add = lowbit.torch.Add()`` and ``self.add(out, x)``
    in a model, or let ``Config(residual_adds=True)`` find the ``x + y`` of ``forward`` (torch.fx) and insert them.
    """

    def __init__(self, quantize: tuple[bool, bool] = (False, True)):
        super().__init__()
        if len(quantize) != 2:
            raise ValueError(f"quantize says for each of the two operands whether to quantize it, got {quantize!r}")
        self.quantize = tuple(bool(v) for v in quantize)

    def extra_repr(self) -> str:
        which = [name for name, q in zip(("a", "b"), self.quantize, strict=True) if q]
        return f"quantize={'+'.join(which) or 'none'}"

    def forward(self, a, b):
        return a + b


class QuantAdd(Add):
    """``a + b`` with a :class:`TensorQuantizer` on each operand :attr:`Add.quantize` names (``input_quantizers``;
    the others are disabled). Operands that are not floating-point tensors (shape arithmetic) are added as they are,
    and the quantizers of such an add switch themselves off during calibration."""

    @classmethod
    def from_float(cls, module: Add, cfg: LayerConfig, name: str = "") -> QuantAdd:
        new = cls(module.quantize)
        new.input_quantizers = nn.ModuleList(
            _quantizer(cfg.input if q else None, 1, f"{name}.input.{i}") for i, q in enumerate(module.quantize)
        )
        new.train(module.training)
        return new

    def calibrate_weight(self) -> None:  # no weight
        pass

    def forward(self, a, b):
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (a, b)):
            for q in self.input_quantizers:
                if q.mode == "calibrate":
                    q.mode = "disabled"
            return a + b
        qa, qb = self.input_quantizers
        return qa(a) + qb(b)


MODULE_MAP: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
    Add: QuantAdd,
}
