"""Block-by-block calibration: statistics for the layers of one repeated block at a time, so that memory holds one
block's statistics and the activations entering one block, not every layer's statistics at once.

A transformer is a stack of identical blocks (an ``nn.ModuleList`` of same-class modules). GPTQ keeps a
``columns x columns`` second moment per layer and AWQ a sample of rows per input; gathered for the whole model in
one pass, that is every layer's statistics at once (a 4096-wide model with 32 blocks: 32 x 7 matrices of 128 MB).
Block by block (as the GPTQ and AWQ papers run them):

1. the inputs of the first block (its positional and keyword arguments: attention masks, position embeddings) are
   captured for every calibration batch, the model stopping there;
2. for each block: the statistics of its layers are gathered by running the block alone on the captured inputs
   (the whole block in float: :attr:`Data.run`), its layers are processed (rounded, smoothed), and the block is
   run once more to give the next block's inputs: quantized as now rounded (``quantized_inputs``, GPTQ's
   sequential setting: each block sees, and corrects for, the error upstream) or in float (AWQ's, and what
   gathering everything in one pass of the float model computes);
3. the layers outside the blocks (an output head) are processed last, from one pass of the whole float model.

Peak memory: the model, the captured inputs and outputs of one block for the calibration set, and one block's
statistics. With float inputs every block's statistics are those of the one-pass method: the same codes.

The blocks are a chain only if each block's output (its first element, for a block that returns a tuple) is the
next block's first input: this is checked on the first batch, against a run of the whole float model, and a
model where it does not hold (a norm between blocks, say) is processed in one pass, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import CalibrationError
from lowbit.torch.quantizer import evaluating
from lowbit.torch.runner import is_loop, run_batch, run_data
from lowbit.torch.switches import only

MIN_BLOCKS = 2  # a ModuleList of fewer same-class modules is not a stack of blocks


@dataclass(frozen=True)
class Data:
    """How a stage runs the calibration data through the part of the model it works on, every quantizer off
    (float): ``run()`` every input, ``run_first()`` the first one only (to see the layers' wiring)."""

    run: Callable[[], None]
    run_first: Callable[[], None]


Process = Callable[[dict[str, nn.Module], Data], list[str]]  # layers, their data -> the names of the layers done


class _Stop(CalibrationError):
    """Stops the model at the first block; a lowbit error so that :func:`~lowbit.torch.runner.run_batch` passes
    it on unwrapped."""


def find_blocks(model: nn.Module) -> list[str]:
    """The names of the modules of ``model``'s longest ``nn.ModuleList`` whose modules are all of one class (at
    least :data:`MIN_BLOCKS`); the first such list when two are as long; [] when there is none."""
    best: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= max(MIN_BLOCKS, len(best) + 1):
            if len({type(c) for c in m}) == 1:
                best = [f"{name}.{i}" if name else str(i) for i in range(len(m))]
    return best


def resolve_blocks(model: nn.Module, blocks: Sequence[str] | bool | None) -> list[str]:
    """The block names to work through: ``None``/``True`` found by :func:`find_blocks`, ``False`` none (one pass),
    or the names given (each a submodule of ``model``, in the order the model runs them)."""
    if blocks is None or blocks is True:
        return find_blocks(model)
    if blocks is False:
        return []
    names = list(blocks)
    known = dict(model.named_modules())
    unknown = [n for n in names if n not in known or not n]
    if unknown:
        raise CalibrationError(
            f"blocks: {', '.join(unknown[:3])} is not a submodule of the model; give the names of its repeated "
            "blocks in order (such as 'layers.0', 'layers.1'), or blocks=None to find them"
        )
    return names


def whole_model(model: nn.Module, calib: Any, desc: str, progress: bool) -> Data:
    """:class:`Data` over the whole model on ``calib`` (batches or a forward loop), in float."""

    def run() -> None:
        with evaluating(model), torch.no_grad(), only(model, []):
            run_data(model, calib, desc, progress)

    def run_first() -> None:
        with evaluating(model), torch.no_grad(), only(model, []):
            if is_loop(calib):
                calib(model)
            else:
                run_batch(model, next(iter(calib)), 0)

    return Data(run, run_first)


Inputs = list[tuple[tuple[Any, ...], dict[str, Any]]]


def capture_inputs(model: nn.Module, block: nn.Module, calib: Any, progress: bool) -> Inputs:
    """The (args, kwargs) ``block`` is called with, for every calibration batch, the model in float and stopped
    there (a forward loop runs whole: it cannot be stopped without ending it)."""
    captured: Inputs = []
    loop = is_loop(calib)

    def grab(module, args, kwargs):
        captured.append(without_cache(args, kwargs))
        if not loop:
            raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with evaluating(model), torch.no_grad(), only(model, []):
            if loop:
                calib(model)
            else:
                for i, batch in enumerate(tqdm(calib, desc="block inputs", disable=not progress, leave=False)):
                    try:
                        run_batch(model, batch, i)
                    except _Stop:
                        pass
    finally:
        handle.remove()
    if not captured:
        raise CalibrationError("the first block never ran on the calibration data; calib must run the model")
    return captured


CACHE_KEYWORDS = ("past_key_value", "past_key_values", "layer_past")


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache")  # transformers' DynamicCache, StaticCache, ...


def without_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block's inputs with no key/value cache: a decoder block of ``transformers`` is called with the model's
    cache, which each call would append to (stale keys and values, and memory growing with every run of the
    block); block by block, every call must see only its own batch."""
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if k in CACHE_KEYWORDS or _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def call_block(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``block(*args, **kwargs)``; a failure is a one-line error that says how to go on."""
    try:
        return block(*args, **kwargs)
    except Exception as exc:
        raise CalibrationError(
            f"running the block {type(block).__name__} on its captured inputs failed ({type(exc).__name__}: {exc}); "
            "set Config.blockwise to False to gather the statistics in one pass through the whole model"
        ) from exc


def _advance(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict]:
    return (_hidden(call_block(block, args, kwargs)), *args[1:]), kwargs


def is_chain(model: nn.Module, names: list[str], first: tuple[tuple[Any, ...], dict[str, Any]], batch: Any) -> bool:
    """Whether each block's output is the next block's first input on ``batch`` (whose first-block inputs are
    ``first``), by comparing the chained float blocks with a float run of the whole model."""
    if not first[0] or not isinstance(first[0][0], torch.Tensor):
        return False
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.setdefault(n, a[0] if a and isinstance(a[0], torch.Tensor) else None)
        )
        for n in names
    ]
    try:
        with evaluating(model), torch.no_grad(), only(model, []):
            run_batch(model, batch, 0)
    finally:
        for h in handles:
            h.remove()
    args, kwargs = first
    with evaluating(model), torch.no_grad(), only(model, []):
        for n in names:
            real = seen.get(n)
            if real is None or real.shape != args[0].shape or not torch.allclose(real, args[0], rtol=1e-4, atol=1e-5):
                return False
            args, kwargs = _advance(model.get_submodule(n), args, kwargs)
    return True


def _block_data(model: nn.Module, block: nn.Module, inputs: Inputs) -> Data:
    def run_on(items: Inputs) -> None:
        with evaluating(model), torch.no_grad(), only(model, []):
            for args, kwargs in items:
                call_block(block, args, kwargs)

    return Data(lambda: run_on(inputs), lambda: run_on(inputs[:1]))


def in_blocks(
    model: nn.Module,
    calib: Any,
    layers: dict[str, nn.Module],
    process: Process,
    *,
    blocks: Sequence[str] | bool | None = None,
    quantized_inputs: bool = True,
    desc: str = "calibration",
    progress: bool = True,
) -> list[str]:
    """Run ``process(layers_of_a_part, data)`` block by block over ``model``'s repeated blocks (see the module
    doc), then on the layers outside them with the whole model; in one pass over the whole model when there are no
    blocks, none of ``layers`` is in one, or the blocks are not a chain. ``quantized_inputs``: the next block's
    inputs come from the block as quantized now (else in float). Returns what the calls of ``process`` returned."""
    names = resolve_blocks(model, blocks)
    if isinstance(calib, Iterator):  # read more than once below: the batches given are kept
        calib = list(calib)
    inside = {b: {n: m for n, m in layers.items() if n.startswith(b + ".")} for b in names}
    if not any(inside.values()):
        return process(layers, whole_model(model, calib, desc, progress))
    inputs = capture_inputs(model, model.get_submodule(names[0]), calib, progress)
    first_batch = None if is_loop(calib) else next(iter(calib))
    if first_batch is None or not is_chain(model, names, inputs[0], first_batch):
        warnings.warn(
            f"{desc}: the blocks {names[0]}..{names[-1]} do not pass their output straight to the next one (or the "
            "calibration data is a forward loop); calibrating in one pass over the whole model",
            stacklevel=3,
        )
        return process(layers, whole_model(model, calib, desc, progress))
    done: list[str] = []
    for name in tqdm(names, desc=desc, unit="block", disable=not progress, leave=False):
        block = model.get_submodule(name)
        if inside[name]:
            done += process(inside[name], _block_data(model, block, inputs))
        with evaluating(model), torch.no_grad(), only(model, []) if not quantized_inputs else nullcontext():
            inputs = [_advance(block, args, kwargs) for args, kwargs in inputs]
    inputs.clear()
    rest = {n: m for n, m in layers.items() if not any(n in part for part in inside.values())}
    if rest:
        done += process(rest, whole_model(model, calib, desc, progress))
    return done
