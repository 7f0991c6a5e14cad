"""The calibrator protocol, its registry, and the checks every calibrator shares.

A calibrator is a small stateful object: ``update(x)`` folds a batch into its statistics, ``merge(other)`` folds
in another calibrator's statistics (from another process, say), ``compute()`` returns the range, ``reset()``
forgets. ``state_dict()`` / ``load_state_dict()`` make the statistics portable.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import numpy as np

from lowbit.errors import CalibrationError, SpecError

_REGISTRY: dict[str, type[Calibrator]] = {}

# How each front end spells the option that makes a calibrator drop NaN/Inf values, for messages.
SKIP_NONFINITE_HINT = (
    "pass skip_nonfinite=True (lowbit quantize: --option skip_nonfinite=true; lowbit calibrate: --skip-nonfinite)"
)


class Range(NamedTuple):
    """A calibrated range: floats per tensor, arrays per channel. Symmetric methods give (-amax, amax)."""

    lo: Any
    hi: Any

    @property
    def amax(self):
        """max(|lo|, |hi|): the symmetric threshold."""
        return np.maximum(np.abs(self.lo), np.abs(self.hi))


def register(name: str) -> Callable[[type[Calibrator]], type[Calibrator]]:
    """Class decorator: make a calibrator available to :func:`create` under ``name``."""

    def decorate(cls: type[Calibrator]) -> type[Calibrator]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a calibrator named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    """The names :func:`create` knows."""
    return sorted(_REGISTRY)


def option_names(method: str) -> list[str]:
    """The keyword options a calibrator takes."""
    return [p for p in inspect.signature(_lookup(method).__init__).parameters if p != "self"]


def _lookup(method: str) -> type[Calibrator]:
    if method not in _REGISTRY:
        raise CalibrationError(f"unknown calibration method {method!r}; known methods: {', '.join(available())}")
    return _REGISTRY[method]


def create(method: str, **options: Any) -> Calibrator:
    """A new calibrator by name, e.g. ``create("entropy", num_bins=2048, tensor="conv1")``.

    >>> create("percentile", percentile=99.9).method
    'percentile'
    """
    cls = _lookup(method)
    known = option_names(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise CalibrationError(
            f"the {method!r} calibrator has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(known)}"
        )
    return cls(**options)


def grid_options(method: str, spec, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``options`` completed with what fits the grid ``spec`` (a :class:`~lowbit.core.QuantSpec`) the range is for,
    unless the user chose otherwise: MSE and ADMM fit that grid (its bits and its symmetry, per tensor), percentile cuts
    both tails for an asymmetric grid. (Entropy needs nothing: its zero bin is handled as NVIDIA's toolkits do.)

    >>> from lowbit.core import QuantSpec
    >>> grid_options("mse", QuantSpec(bits=4, signed=False, symmetric=False))["spec"].bits
    4
    """
    from dataclasses import replace

    out = dict(options or {})
    if method in ("mse", "admm"):
        out.setdefault("spec", replace(spec, axis=None, group_size=None))
    elif method == "percentile":
        out.setdefault("symmetric", spec.symmetric)
    return out


class Calibrator:
    """Base class. Subclasses implement ``_update``, ``_merge``, ``_compute``, ``_reset``, ``_state``, ``_load``.

    ``tensor`` names the tensor in error messages; ``skip_nonfinite=True`` drops NaN and Inf values instead of
    failing on them.
    """

    method: ClassVar[str] = ""
    # Options that do not change the statistics: calibrators that differ only in these can merge.
    _cosmetic: ClassVar[frozenset[str]] = frozenset({"tensor", "skip_nonfinite"})

    def __init__(self, *, tensor: str | None = None, skip_nonfinite: bool = False):
        self.tensor = tensor
        self.skip_nonfinite = bool(skip_nonfinite)
        self.num_batches = 0

    # -- the protocol ------------------------------------------------------------------------------------------
    def update(self, x) -> None:
        """Fold one batch into the statistics."""
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise CalibrationError(f"{self.describe()}: expected a numeric array, got dtype {x.dtype}")
        if x.size == 0:
            return
        try:
            self._update(x)
        except SpecError as exc:
            raise CalibrationError(f"{self.describe()}: {exc}") from None
        self.num_batches += 1

    def merge(self, other: Calibrator) -> None:
        """Fold in the statistics of ``other``, a calibrator of the same method and options."""
        if type(other) is not type(self):
            raise CalibrationError(
                f"cannot merge a {other.method or type(other).__name__} calibrator into {self.describe()}"
            )
        mine, theirs = self._statistical_options(), other._statistical_options()
        if mine != theirs:
            diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
            raise CalibrationError(f"cannot merge into {self.describe()}: options differ {diff}")
        if other.num_batches == 0:
            return
        if self.num_batches == 0:
            self.load_state_dict(other.state_dict())
            return
        self._merge(other)
        self.num_batches += other.num_batches

    def compute(self) -> Range:
        """The calibrated range."""
        if self.num_batches == 0:
            raise CalibrationError(
                f"{self.describe()}: compute() was called before any update(); feed it at least one batch"
            )
        return self._compute()

    def reset(self) -> None:
        """Forget every statistic (options stay)."""
        self.num_batches = 0
        self._reset()

    def state_dict(self) -> dict[str, Any]:
        """Method, options and statistics as plain data (NumPy arrays and JSON-able values)."""
        return {
            "method": self.method,
            "options": self.options(),
            "num_batches": self.num_batches,
            "state": {k: np.asarray(v) for k, v in self._state().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the statistics with ``state`` (from :meth:`state_dict` of a calibrator like this one)."""
        if state.get("method") != self.method:
            raise CalibrationError(f"{self.describe()}: cannot load the state of a {state.get('method')!r} calibrator")
        theirs = {k: v for k, v in state.get("options", {}).items() if k not in self._cosmetic}
        if theirs != self._statistical_options():
            raise CalibrationError(
                f"{self.describe()}: the state was saved with options {theirs}, "
                f"this calibrator has {self._statistical_options()}"
            )
        self._load({k: np.asarray(v) for k, v in state["state"].items()})
        self.num_batches = int(state["num_batches"])

    # -- helpers -----------------------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The constructor options, JSON-able."""
        out = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name == "self":
                continue
            value = getattr(self, name)
            out[name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    def _statistical_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options().items() if k not in self._cosmetic}

    def describe(self) -> str:
        """'entropy calibrator for tensor "conv1"', for messages."""
        name = f"{self.method or type(self).__name__} calibrator"
        return f"{name} for tensor {self.tensor!r}" if self.tensor else name

    def _nonfinite(self, x: np.ndarray) -> np.ndarray:
        """A boolean mask of the finite values, or a clear error if NaN/Inf are not to be skipped."""
        finite = np.isfinite(x)
        if not self.skip_nonfinite:
            nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
            raise CalibrationError(
                f"{self.describe()}: batch {self.num_batches} (counting from 0) contains {nan} NaN and {inf} Inf "
                f"values; fix the data upstream, or ignore such values: {SKIP_NONFINITE_HINT}"
            )
        return finite

    def _update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def _merge(self, other: Calibrator) -> None:
        raise NotImplementedError

    def _compute(self) -> Range:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError
