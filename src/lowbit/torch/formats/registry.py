"""How :class:`~lowbit.torch.TensorQuantizer` runs a number format other than uniform integers: one
:class:`TorchFormat` per :mod:`lowbit.core.formats` name, each in its own file of this package.

Uniform integers (``int``) are the quantizer's own :func:`lowbit.torch.quantizer.fake_quant`; a format registered
here gives the fake quantization (with its straight-through gradient) that training and evaluation run, and the
traced form that :func:`lowbit.torch.export_onnx` writes.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lowbit.core import QuantSpec
from lowbit.errors import SpecError

_FORMATS: dict[str, TorchFormat] = {}


class TorchFormat:
    """One number format in PyTorch. Subclasses set :attr:`name` (a :mod:`lowbit.core.formats` name)."""

    name: ClassVar[str] = ""
    min_opset: ClassVar[int] = 13  # the first ONNX opset whose Q/DQ (or other nodes) its exported form needs

    def fake_quant(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, grad_factor: float
    ) -> torch.Tensor:
        """The real values ``x`` becomes, differentiable as the format's straight-through estimator says;
        ``scale`` and ``zero_point`` in :func:`~lowbit.core.layout.param_shape`, ``grad_factor`` scales the
        gradient that reaches a learned ``scale`` (LSQ)."""
        raise NotImplementedError

    def tensor_scale(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """The scale a format whose scale is the tensor's own statistic (binary, ternary) takes from ``x``, in
        :func:`~lowbit.core.layout.param_shape`."""
        raise NotImplementedError

    def export(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """The traced form of the fake quantization (ONNX nodes written by ``torch.onnx.export``)."""
        raise SpecError(f"number format {self.name!r} has no ONNX export yet")


def register(cls: type[TorchFormat]) -> type[TorchFormat]:
    """Class decorator: run the format ``cls.name`` in PyTorch."""
    if cls.name in _FORMATS:
        raise SpecError(f"a PyTorch number format named {cls.name!r} is registered twice")
    _FORMATS[cls.name] = cls()
    return cls


def get(name: str) -> TorchFormat:
    """The PyTorch form of the format called ``name``; a format lowbit.core has but PyTorch does not is an error."""
    if name not in _FORMATS:
        raise SpecError(f"number format {name!r} does not run in lowbit.torch; there: int, {', '.join(_FORMATS)}")
    return _FORMATS[name]
