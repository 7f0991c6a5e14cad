"""Number formats in PyTorch, one file each (see :mod:`lowbit.torch.formats.registry`)."""

from lowbit.torch.formats.registry import TorchFormat, get, register

__all__ = ["TorchFormat", "get", "register"]
