"""Which process this is in a torch.distributed process group, and the reductions the quantizers need in one.

Outside a process group (or in a group of one) this is rank 0 of 1 and every reduction returns its input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of ranks of the default process group (1 outside one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 outside one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def global_minmax(lo: np.ndarray, hi: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """The element-wise min of ``lo`` and max of ``hi`` over all ranks (``device``: where the backend reduces,
    the data's device: CPU for gloo, the GPU for NCCL)."""
    if world_size() == 1:
        return lo, hi
    low = torch.as_tensor(np.asarray(lo, np.float64), device=device)
    high = torch.as_tensor(np.asarray(hi, np.float64), device=device)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return low.cpu().numpy().astype(np.asarray(lo).dtype), high.cpu().numpy().astype(np.asarray(hi).dtype)
