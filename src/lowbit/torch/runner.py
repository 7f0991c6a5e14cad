"""Running a PyTorch model on calibration data: one batch (a tensor, a tuple of positional inputs or a dict of
keyword inputs), every batch under a progress bar, or the user's forward loop ``calib(model)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import CalibrationError

Calib = Iterable[Any] | Callable[[nn.Module], Any]


def call(model: nn.Module, batch: Any) -> Any:
    """``model`` on one batch: a tensor, positional inputs (tuple/list) or keyword inputs (dict)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise CalibrationError(
        f"a calibration batch must be a tensor, a tuple/list of tensors or a dict of them, got {type(batch).__name__}"
    )


def run_batch(model: nn.Module, batch: Any, index: int) -> Any:
    """:func:`call`, with an error that names the batch and says what ``calib`` must yield when it fails."""
    try:
        return call(model, batch)
    except CalibrationError:
        raise
    except Exception as exc:  # the user's data or model: say which batch and what calib must yield
        raise CalibrationError(
            f"running the model on calibration batch {index} failed ({type(exc).__name__}: {exc}). calib must "
            "yield what the model's forward takes: a tensor, a tuple of positional inputs or a dict of keyword "
            "inputs, with the shapes the model expects (or pass a callable calib(model) that runs it)"
        ) from exc


def run_data(model: nn.Module, calib: Calib, desc: str, progress: bool, batches: Iterable[Any] | None = None) -> int:
    """Run ``calib`` through ``model``: a forward loop ``calib(model)`` is called, batches run one by one under a
    progress bar (``batches``, when given, replace ``calib``'s own: what is left after a first batch was taken).
    Returns how many batches ran (0 for a forward loop)."""
    if batches is None and is_loop(calib):
        calib(model)
        return 0
    source = batches if batches is not None else calib
    total = len(calib) if hasattr(calib, "__len__") else None
    count = 0
    for count, batch in enumerate(
        tqdm(source, total=total, desc=desc, unit="batch", disable=not progress, leave=False), 1
    ):
        run_batch(model, batch, count - 1)
    return count


def is_loop(calib: Calib) -> bool:
    """Whether ``calib`` is a forward loop ``calib(model)`` rather than an iterable of batches."""
    return callable(calib) and not isinstance(calib, (torch.Tensor, Iterable))
