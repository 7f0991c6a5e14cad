"""lowbit.torch in a torch.distributed process group (torchrun; gloo on CPU, NCCL on GPU).

Run the same script on every rank, each with its own shard of the calibration data::

    torchrun --nproc-per-node 2 calibrate.py

    # calibrate.py
    import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
    import lowbit.torch as lt
    dist.init_process_group("gloo")                      # "nccl" on GPUs
    qmodel = lt.quantize(model, "int8", calib=lt.shard(batches))   # every rank: the same scales
    if dist.get_rank() == 0:
        lt.export_onnx(qmodel, example, "model.int8.onnx")

Calibration statistics are merged across ranks before any range is computed: each rank gathers every rank's
statistics (:func:`torch.distributed.all_gather_object`) and folds them in rank order, so every rank ends with the
same statistics, hence the same scales. lowbit's histograms merge exactly (power-of-two bin widths) and min/max
merge by min/max, so the scales equal, bit for bit, those one process computes on the union of the shards, for
minmax, percentile, entropy, mse and admm (per-channel minima and maxima too). EMA is the exception: a moving
average depends on the order of the batches; it is merged as the min/max of the ranks' averages, which is not
what one process would compute.

Quantization-aware training: wrap the quantized model with :func:`ddp` (DistributedDataParallel, with its
quantizers told that each rank sees a shard of the global batch). A learned scale is a parameter whose gradient
DDP averages (its LSQ gradient scale then counts the global batch), and an activation range that follows the data
(``observe_steps``) follows the min/max of the global batch (:func:`lowbit.torch.ranks.global_minmax`), so a step
on W ranks of B / W samples equals a step on one of B. Without :func:`ddp` the quantizers stay per process (no
collective in a forward: a forward on one rank alone cannot hang).

Weight ranges need no merge: every rank holds the same weights. GPTQ's second moments (:func:`reduce_moment`) are
summed across ranks (all_reduce), equal to one process's up to float64 rounding of the summation order. The
methods that search on samples of the data (AWQ, SmoothQuant, AdaRound, EasyQuant) are refused in a group of
several ranks (:func:`check_methods`): each rank would choose from its own shard and the ranks would differ.
Outside a process group (or in a group of one) every function here does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowbit.errors import CalibrationError
from lowbit.torch.quantizer import TensorQuantizer
from lowbit.torch.ranks import rank, world_size


def is_main() -> bool:
    """Whether this process is rank 0 (or there is no process group): the one that prints and writes."""
    return rank() == 0


def shard(batches: Iterable[Any]) -> Iterator[Any]:
    """This rank's share of ``batches``: a contiguous slice when ``batches`` has a length (rank r of W gets
    batches ``[r n / W, (r + 1) n / W)``), else every W-th batch from the r-th. The shards of all ranks are the
    batches, each once. Outside a process group: all of them."""
    size, me = world_size(), rank()
    if size == 1:
        yield from batches
        return
    if isinstance(batches, Sequence) or (hasattr(batches, "__len__") and hasattr(batches, "__getitem__")):
        n = len(batches)
        for i in range(me * n // size, (me + 1) * n // size):
            yield batches[i]
        return
    for i, batch in enumerate(batches):
        if i % size == me:
            yield batch


def ddp(model: nn.Module, **options: Any) -> DistributedDataParallel:
    """``DistributedDataParallel(model, **options)`` for QAT, with every quantizer of ``model`` following the
    global batch (see the module doc). Call it in a process group, after :func:`lowbit.torch.quantize`."""
    if world_size() == 1:
        raise CalibrationError("lowbit.torch.ddp wraps a model for several ranks: call dist.init_process_group first")
    for q in model.modules():
        if isinstance(q, TensorQuantizer):
            q.data_parallel = True
    return DistributedDataParallel(model, **options)


def check_methods(smoothing: bool, rounding: str, refine: str | None) -> None:
    """A one-line error for a method that cannot run across several ranks (see the module doc)."""
    if world_size() == 1:
        return
    named = [n for n, on in (("smoothquant", smoothing), (f"rounding={rounding!r}", rounding in
             ("awq", "awq+gptq", "adaround")), (f"refine={refine!r}", refine is not None)) if on]  # fmt: skip
    if named:
        raise CalibrationError(
            f"{named[0]} searches on samples of the data, which each of the {world_size()} ranks would choose from "
            "its own shard: run it in one process (nearest and gptq round the same on every rank)"
        )


def merge_calibration(quantizers: Sequence[TensorQuantizer]) -> None:
    """Give every quantizer of ``quantizers`` (the same model on every rank, in the same order) the statistics
    of all ranks: gathered from every rank, folded in rank order, the same on each. Call it after the calibration
    pass and before the ranges are computed (:func:`lowbit.torch.calibrate` does)."""
    size = world_size()
    if size == 1:
        return
    mine = [q.calibration_state() for q in quantizers]
    gathered: list[list[Any] | None] = [None] * size
    dist.all_gather_object(gathered, mine)
    counts = {len(states) for states in gathered}
    if counts != {len(quantizers)}:
        raise CalibrationError(
            f"the ranks calibrate different models ({', '.join(str(len(s)) for s in gathered)} quantizers): "
            "every rank must quantize the same model with the same recipe"
        )
    for i, q in enumerate(quantizers):
        q.clear_calibration()
        for states in gathered:
            q.merge_calibration_state(states[i])


def reduce_moment(moment) -> None:
    """Sum a :class:`lowbit.core.gptq.SecondMoment` (its ``sum`` and ``count``) over the ranks, in place. A rank
    that saw no rows contributes zeros; all ranks must call it for the same layers in the same order."""
    if world_size() == 1:
        return
    gathered: list[Any] = [None] * world_size()
    shape = None if moment.sum is None else tuple(moment.sum.shape)
    dist.all_gather_object(gathered, shape)
    shapes = {s for s in gathered if s is not None}
    if not shapes:
        return
    if len(shapes) > 1:
        raise CalibrationError(f"the ranks' second moments differ in shape: {sorted(shapes)}")
    (shape,) = shapes
    total = torch.zeros(shape, dtype=torch.float64) if moment.sum is None else _as_tensor(moment.sum)
    count = torch.tensor([float(moment.count)], dtype=torch.float64, device=total.device)
    dist.all_reduce(total)
    dist.all_reduce(count)
    moment.sum = total if hasattr(moment.sum, "double") else total.cpu().numpy()
    moment.count = int(count.item())


def _as_tensor(value) -> torch.Tensor:
    return value.double() if isinstance(value, torch.Tensor) else torch.from_numpy(value).double()
