"""GPTQ rounding in NumPy: integer codes for a weight matrix that make the layer's *output* error least on the data.

Rounding each weight to its nearest code minimizes ``|W_q - W|``; the network feels ``(W_q - W) x``, whose mean
square over the data is ``tr(ΔW H ΔW^T)`` with ``H = E[x x^T]`` the second moment of the layer's input rows.
GPTQ (Frantar et al. 2022, after Optimal Brain Quantization) rounds one input column at a time and spreads each
column's rounding error over the columns not yet rounded, weighted by ``H^-1``, so that the errors cancel on the
data. Scales and zero points stay as given (plain rounding's); only the codes change.

Both front ends use :func:`round_matrix`: :mod:`lowbit.onnx.gptq` (weights of an ONNX graph) and
:mod:`lowbit.torch.rounding.gptq` (a quantized PyTorch model's layers).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean, so that H^-1 exists
BLOCK = 128  # columns rounded between two updates of the rest (GPTQ's lazy batch updates)
ROWS_PER_COLUMN = 8  # fewer input rows than this per column: H is too poorly known, GPTQ would fit the samples


def round_matrix(
    w: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | float,
    qmin: int,
    qmax: int,
    h: np.ndarray,
    damp: float = DAMP,
    act_order: bool = False,
) -> np.ndarray | None:
    """GPTQ's integer codes of ``w`` (groups, rows, columns): a row per output unit, a column per input feature.

    ``scale`` and ``zero_point`` broadcast to ``w``'s shape (per tensor, per row, or per column group: each column
    is rounded at its own scale); codes are ``clip(round(w / scale) + zero_point, qmin, qmax)`` as plain rounding,
    with ``w`` updated column by column. ``h`` (groups, columns, columns) is the second moment of the input rows.
    ``act_order``: round the columns in order of decreasing ``diag(h)`` (the inputs with the most energy first,
    while the most columns are left to absorb their error); the scales stay those given ("static groups").
    Returns the codes as float64 (groups, rows, columns), or None when ``h`` cannot be inverted. A column that
    never saw data (a dead input) keeps its nearest code: nothing flows through it."""
    W = np.array(w, dtype=np.float64)
    if W.ndim != 3 or h.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(
            f"w must be (groups, rows, columns) and h (groups, columns, columns); got {W.shape} and {h.shape}"
        )
    s = np.array(np.broadcast_to(np.asarray(scale, np.float64), W.shape))
    z = np.array(np.broadcast_to(np.asarray(zero_point, np.float64), W.shape))
    H = np.array(h, dtype=np.float64)
    order = _act_order(H) if act_order else None
    if order is not None:
        W, s, z, H = W[:, :, order], s[:, :, order], z[:, :, order], H[:, order][:, :, order]
    Q = _round(W, s, z, qmin, qmax, H, damp)
    if Q is None or order is None:
        return Q
    out = np.empty_like(Q)
    out[:, :, order] = Q
    return out


Fit = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def round_groups(
    w: np.ndarray, group_size: int, fit: Fit, qmin: int, qmax: int, h: np.ndarray, damp: float = DAMP
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """GPTQ with per-group scales fitted as it goes (the GPTQ paper's grouping): when rounding reaches the first
    column of a group of ``group_size`` columns, ``fit(block)`` (block: (groups, rows, group_size) of the weights
    *as updated so far*) gives that group's scale and zero point, each (groups, rows, 1), so each group's grid
    fits the weights it will round. Returns ``(codes, scale, zero_point)``, the latter two (groups, rows,
    columns / group_size); None when ``h`` cannot be inverted. ``columns`` must be a multiple of ``group_size``."""
    W = np.array(w, dtype=np.float64)
    if W.shape[2] % group_size:
        raise ValueError(f"{W.shape[2]} columns are not a whole number of groups of {group_size}")
    s, z = np.zeros_like(W), np.zeros_like(W)
    Q = _round(W, s, z, qmin, qmax, np.array(h, dtype=np.float64), damp, fit, group_size)
    if Q is None:
        return None
    return Q, s[:, :, ::group_size].copy(), z[:, :, ::group_size].copy()


def _act_order(H: np.ndarray) -> np.ndarray:
    """One column order for all groups of ``H``: decreasing diagonal summed over groups (stable)."""
    d = np.einsum("gii->i", H)
    return np.argsort(-d, kind="stable")


def _round(W, s, z, qmin, qmax, H, damp, fit: Fit | None = None, group_size: int = 0):
    """GPTQ's column loop with lazy batch updates (blocks of :data:`BLOCK` columns) on ``W`` in place; ``s``
    and ``z`` are per element, filled group by group from ``fit`` when it is given."""
    D = W.shape[2]
    idx = np.arange(D)
    diag = H[:, idx, idx]
    H[:, idx, idx] = np.where(diag <= 0, 1.0, diag)  # dead columns: their rows and columns of H are 0
    H[:, idx, idx] += damp * H[:, idx, idx].mean(axis=1, keepdims=True)
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).transpose(0, 2, 1)  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(U)):
        return None
    Q = np.zeros_like(W)
    for i1 in range(0, D, BLOCK):
        i2 = min(i1 + BLOCK, D)
        block = W[:, :, i1:i2].copy()
        err = np.zeros_like(block)
        for j in range(i2 - i1):
            c = i1 + j
            if fit is not None and c % group_size == 0:
                current = np.concatenate([block[:, :, j:], W[:, :, i2:]], axis=2)[:, :, :group_size]
                gs, gz = fit(current)
                s[:, :, c : c + group_size] = gs
                z[:, :, c : c + group_size] = gz
            col = block[:, :, j]
            q = np.clip(np.rint(col / s[:, :, c]) + z[:, :, c], qmin, qmax)
            Q[:, :, c] = q
            e = (col - (q - z[:, :, c]) * s[:, :, c]) / U[:, None, c, c]
            block[:, :, j + 1 :] -= e[:, :, None] * U[:, None, c, c + 1 : i2]
            err[:, :, j] = e
        W[:, :, i2:] -= np.matmul(err, U[:, i1:i2, i2:])
    return Q


class SecondMoment:
    """Running ``sum(r r^T)`` of a layer's input rows ``r``, per group, and the number of rows: GPTQ's
    ``H = E[r r^T]`` is :attr:`value`. Both front ends gather it: the ONNX one from NumPy arrays, the PyTorch one
    from tensors on the model's device. Each batch's product is computed in the batch's precision (float32: fast),
    the sum over batches in float64 (no drift over many batches).

    >>> m = SecondMoment()
    >>> m.add(np.ones((1, 2, 3), np.float32))       # (groups, columns, rows)
    >>> m.value.tolist(), m.count
    ([[[1.0, 1.0], [1.0, 1.0]]], 3)
    """

    def __init__(self):
        self.sum = None
        self.count = 0

    def add(self, rows) -> None:
        """Fold in ``rows`` (groups, columns, n), a NumPy array or a torch tensor."""
        self.add_product(rows @ rows.swapaxes(1, 2), rows.shape[2])

    def add_product(self, h, rows: int) -> None:
        """Fold in a batch's ``sum(r r^T)`` already computed (groups, columns, columns) over ``rows`` rows."""
        h = h.double() if hasattr(h, "double") else np.asarray(h, dtype=np.float64)
        self.sum = h if self.sum is None else self.sum + h
        self.count += rows

    def merge(self, other: SecondMoment) -> None:
        """Fold in the rows ``other`` saw (another shard of the data, another process): the sums add."""
        if other.sum is not None:
            self.add_product(other.sum, other.count)

    @property
    def value(self):
        """``sum / count``: the second moment (float64)."""
        if self.sum is None:
            raise ValueError("no data seen")
        return self.sum / self.count
