"""Number formats in PyTorch, one file each (see :mod:`lowbit.torch.formats.registry`)."""

from lowbit.torch.formats.registry import TorchFormat, get, register

__all__ = ["TorchFormat", "get", "register"]

from lowbit.torch.formats import fp8  # noqa: F401  (registers fp8_e4m3 and fp8_e5m2)
