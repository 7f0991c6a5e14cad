"""Where the scales live: per tensor, per channel, or per group of elements along an axis.

Parameter shapes follow ONNX QuantizeLinear:
    per tensor   ()                        one scale
    per channel  (x.shape[axis],)          one scale per slice along ``axis``
    per group    x.shape with x.shape[axis] replaced by ceil(x.shape[axis] / group_size)
"""

from __future__ import annotations

import numpy as np

from lowbit.core.spec import QuantSpec
from lowbit.errors import SpecError


def normalize_axis(axis: int, ndim: int) -> int:
    """``axis`` as a non-negative index into a tensor of rank ``ndim``."""
    if not -ndim <= axis < ndim:
        raise SpecError(f"axis {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim


def param_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """The shape of the scale and zero point for a tensor of ``shape`` under ``spec``.

    >>> param_shape((64, 32), QuantSpec(axis=1, group_size=8))
    (64, 4)
    """
    if spec.axis is None:
        return ()
    axis = normalize_axis(spec.axis, len(shape))
    if spec.group_size is None:
        return (shape[axis],)
    out = list(shape)
    out[axis] = -(-shape[axis] // spec.group_size)
    return tuple(out)


def reduce(x: np.ndarray, spec: QuantSpec, how: str) -> np.ndarray:
    """Reduce ``x`` to one value per scale: ``how`` is ``min``, ``max``, ``absmean`` or ``sum``.

    >>> reduce(np.array([[1., -2.], [3., 4.]]), QuantSpec(axis=0), "max")
    array([1., 4.])
    """
    ops = {"min": np.min, "max": np.max, "absmean": lambda a, axis: np.mean(np.abs(a), axis=axis), "sum": np.sum}
    nan_ops = {
        "min": np.nanmin,
        "max": np.nanmax,
        "absmean": lambda a, axis: np.nanmean(np.abs(a), axis=axis),
        "sum": np.nansum,
    }
    if how not in ops:
        raise ValueError(f"how must be one of {', '.join(ops)}, got {how!r}")
    x = np.asarray(x)
    if x.size == 0:
        raise SpecError("cannot compute quantization parameters of an empty tensor")
    if spec.axis is None:
        return np.asarray(ops[how](x, axis=None))
    axis = normalize_axis(spec.axis, x.ndim)
    if spec.group_size is None:
        others = tuple(i for i in range(x.ndim) if i != axis)
        return np.asarray(ops[how](x, axis=others))
    # Blocks along `axis`: move it last, pad the short last block with NaN, reduce each block.
    g = spec.group_size
    moved = np.moveaxis(x.astype(np.float64, copy=False), axis, -1)
    n = moved.shape[-1]
    blocks = -(-n // g)
    if blocks * g != n:
        pad = [(0, 0)] * (moved.ndim - 1) + [(0, blocks * g - n)]
        moved = np.pad(moved, pad, constant_values=np.nan)
    reduced = nan_ops[how](moved.reshape(*moved.shape[:-1], blocks, g), axis=-1)
    return np.moveaxis(reduced, -1, axis)


def broadcast(param: np.ndarray, shape: tuple[int, ...], spec: QuantSpec, name: str = "scale") -> np.ndarray:
    """Expand a scale or zero point of :func:`param_shape` so that it broadcasts against ``shape``."""
    param = np.asarray(param)
    expected = param_shape(shape, spec)
    if spec.axis is None:
        if param.size != 1:
            raise SpecError(
                f"a per-tensor spec needs one {name}, got {name} of shape {param.shape}; "
                "set QuantSpec.axis for per-channel parameters"
            )
        return param.reshape(())
    if param.shape != expected:
        raise SpecError(
            f"{name} of shape {param.shape} does not fit a tensor of shape {tuple(shape)} "
            f"quantized per {spec.granularity} (axis={spec.axis}"
            + (f", group_size={spec.group_size}" if spec.group_size else "")
            + f"): expected {name} of shape {expected}"
        )
    axis = normalize_axis(spec.axis, len(shape))
    if spec.group_size is None:
        dims = [1] * len(shape)
        dims[axis] = shape[axis]
        return param.reshape(dims)
    return np.repeat(param, spec.group_size, axis=axis).take(range(shape[axis]), axis=axis)
