"""Number formats by name: the registry (:mod:`lowbit.core.formats.registry`) and one file per format. Uniform
integers (``int``) live in :mod:`lowbit.core.quant`; :mod:`lowbit.core` imports every format file, so that each
registers itself."""

from lowbit.core.formats.registry import (
    Format,
    available,
    get,
    label,
    limits,
    register,
    scales_itself,
    weights_only,
)

__all__ = ["Format", "available", "get", "label", "limits", "register", "scales_itself", "weights_only"]
