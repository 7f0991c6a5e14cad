"""Number formats in PyTorch, one file each (see :mod:`lowbit.torch.formats.registry`)."""

from lowbit.core.formats import scales_itself
from lowbit.torch.formats import fp8, log2, ternary
from lowbit.torch.formats.binary import BINARY
from lowbit.torch.formats.registry import TorchFormat, get, register


def for_spec(spec) -> TorchFormat | None:
    """The PyTorch form of ``spec``'s format: None for uniform integers of 2 bits or more (the quantizer's own
    fake quantization), binarization for ``bits=1``, the registered format otherwise."""
    if spec.format == "int":
        return BINARY if spec.bits == 1 else None
    return get(spec.format)


__all__ = ["TorchFormat", "for_spec", "fp8", "get", "log2", "register", "scales_itself", "ternary"]
