"""A layer's input and output inside a model run on one batch, the float model or the quantized one: what the
stages that work layer by layer on the quantized model's own inputs read (AdaRound, :mod:`lowbit.torch.easyquant`).

    order = run_order(model, layers, batches[0])                    # the layers in the order the model runs them
    run_to(model, layer, batch, take_output=targets.append, float_model=True)   # its FP32 output
    run_to(model, layer, batch, take_input=inputs.append)           # its input, every layer before it quantized

The model runs only as far as the layer: a hook raises :class:`Stop` once it has what it came for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lowbit.torch.quantizer import TensorQuantizer
from lowbit.torch.runner import call, run_batch


class Stop(Exception):
    """Raised by a hook once it has what it came for: the rest of the forward pass is not needed."""


@contextlib.contextmanager
def all_float(model: nn.Module) -> Iterator[None]:
    """Within the block every quantizer of ``model`` is off (the FP32 model); their modes come back after."""
    saved = [(q, q.mode) for q in model.modules() if isinstance(q, TensorQuantizer)]
    try:
        for q, _ in saved:
            q.mode = "disabled"
        yield
    finally:
        for q, mode in saved:
            q.mode = mode


def run_to(
    model: nn.Module,
    module: nn.Module,
    batch: Any,
    *,
    take_input: Callable[[torch.Tensor], Any] | None = None,
    take_output: Callable[[torch.Tensor], Any] | None = None,
    float_model: bool = False,
) -> None:
    """Run ``model`` on ``batch`` (without gradients) until ``module`` is about to run (only ``take_input``) or
    has run (``take_output``): ``take_input`` gets the layer's first input, as it arrives, before the layer's own
    input quantizer; ``take_output`` its output. ``float_model``: with every quantizer off. Only the first call of
    a layer that runs several times is seen; a layer that never runs on the batch calls neither."""

    def on_input(m: nn.Module, args: tuple[Any, ...]) -> None:
        take_input(args[0])
        if take_output is None:
            raise Stop

    def on_output(m: nn.Module, args: tuple[Any, ...], y: torch.Tensor) -> None:
        take_output(y)
        raise Stop

    hooks = []
    if take_input is not None:
        hooks.append(module.register_forward_pre_hook(on_input))
    if take_output is not None:
        hooks.append(module.register_forward_hook(on_output))
    try:
        with all_float(model) if float_model else contextlib.nullcontext(), torch.no_grad():
            call(model, batch)  # the batches already ran in calibration: no other error to expect
    except Stop:
        pass
    finally:
        for hook in hooks:
            hook.remove()


def run_order(model: nn.Module, found: dict[str, nn.Module], batch: Any) -> list[str]:
    """The names of the layers ``found`` in the order the float model runs them on one batch (a topological order
    of the layers; module order for a sequential model), then those it did not run, in ``found``'s order."""
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=name: order.append(n) if n not in order else None)
        for name, m in found.items()
    ]
    try:
        with torch.no_grad(), all_float(model):
            run_batch(model, batch, 0)
    finally:
        for h in hooks:
            h.remove()
    return order + [n for n in found if n not in order]
