"""A streaming histogram that never keeps raw values, widens exactly, and merges exactly.

Bins have width ``2**exponent`` and are counted by magnitude on each side of zero:
``counts[1, k]`` holds the values x >= 0 with floor(x / width) == k, ``counts[0, k]`` the values x < 0 with
floor(|x| / width) == k. Each side has ``2 * num_bins`` bins, and the width is the smallest power of two for
which max|x| falls inside them, so the data always spans between ``num_bins`` and ``2 * num_bins`` bins.

Why powers of two: ``x * 2**-exponent`` is exact in floating point, so a value's bin does not depend on the
order of the batches, and doubling the width merges bin pairs exactly. Hence ``merge(a, b)`` equals one
histogram of all the data, bit for bit, and so does any order or split of the batches.
"""

from __future__ import annotations

import math

import numpy as np

# Work on blocks of this many elements so the temporaries stay in cache.
_BLOCK = 1 << 18


class Histogram:
    """Counts of values on a power-of-two grid, symmetric about zero.

    >>> h = Histogram(num_bins=4)
    >>> h.update(np.array([0.5, -1.0, 3.0]))
    >>> h.width, h.magnitude().tolist()
    (0.5, [0, 1, 1, 0, 0, 0, 1])
    """

    def __init__(self, num_bins: int = 2048):
        if not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
        self.num_bins = num_bins
        self.reset()

    def reset(self) -> None:
        self.counts = np.zeros((2, 2 * self.num_bins), dtype=np.int64)
        self.exponent: int | None = None  # None until a non-zero value arrives
        self.lo = math.inf
        self.hi = -math.inf
        self.total = 0

    @property
    def width(self) -> float:
        """The bin width, 2**exponent (1.0 while every value seen was zero)."""
        return 1.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    @property
    def amax(self) -> float:
        """max|x| of everything seen."""
        return max(-self.lo, self.hi, 0.0) if self.total else 0.0

    def _fits(self, amax: float, exponent: int) -> bool:
        return math.floor(math.ldexp(amax, -exponent)) < 2 * self.num_bins

    def _fit_exponent(self, amax: float, floor_exponent: int | None) -> int:
        """The smallest exponent >= floor_exponent whose grid holds amax."""
        e = math.frexp(amax)[1] - math.frexp(2 * self.num_bins)[1]
        if floor_exponent is not None:
            e = max(e, floor_exponent)
        while not self._fits(amax, e):
            e += 1
        while (floor_exponent is None or e > floor_exponent) and self._fits(amax, e - 1):
            e -= 1
        return e

    def _coarsen(self, exponent: int) -> None:
        """Widen the bins to 2**exponent by summing groups of old bins (exact)."""
        if self.exponent is None:  # only zeros so far: they stay in bin 0 on any grid
            self.exponent = exponent
            return
        if exponent <= self.exponent:
            return
        shift = exponent - self.exponent
        n = 2 * self.num_bins
        if shift >= n.bit_length():
            merged = np.zeros_like(self.counts)
            merged[:, 0] = self.counts.sum(axis=1)
        else:
            f = 1 << shift
            groups = -(-n // f)
            padded = np.zeros((2, groups * f), dtype=np.int64)
            padded[:, :n] = self.counts
            merged = np.zeros_like(self.counts)
            merged[:, :groups] = padded.reshape(2, groups, f).sum(axis=2)
        self.counts = merged
        self.exponent = exponent

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Add the values of ``x`` (finite floats). ``lo``/``hi``: x.min()/x.max() if already known."""
        x = np.asarray(x)
        if x.dtype.kind != "f" or x.dtype.itemsize < 4:
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if x.size == 0:
            return
        lo = float(x.min()) if lo is None else float(lo)
        hi = float(x.max()) if hi is None else float(hi)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.total += x.size
        amax = max(-lo, hi)
        if amax == 0.0:
            self.counts[1, 0] += x.size  # -0.0 and 0.0 both count as x >= 0
            return
        if self.exponent is None or not self._fits(amax, self.exponent):
            self._coarsen(self._fit_exponent(amax, self.exponent))
        n = 2 * self.num_bins
        inv_width = math.ldexp(1.0, -self.exponent)
        # 2**-exponent must be a normal number of the working type for the product to stay exact.
        scale = x.dtype.type(inv_width) if abs(self.exponent) < 120 else np.float64(inv_width)
        # Branch-free bin index into [negative side reversed | non-negative side]: trunc(x / width) is
        # -k for x < 0 and k for x >= 0, where k = floor(|x| / width), so n + trunc - (x < 0) lands on
        # n - 1 - k and n + k. No data-dependent branch, so random signs cost nothing extra.
        flat = np.zeros(2 * n, dtype=np.int64)
        for start in range(0, x.size, _BLOCK):
            block = x[start : start + _BLOCK]
            k = (block * scale).astype(np.int32)
            k += n
            k -= block < 0
            flat += np.bincount(k, minlength=2 * n)
        self.counts[0] += flat[n - 1 :: -1]
        self.counts[1] += flat[n:]

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s counts, as if its values had been passed to :meth:`update`."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge histograms of {self.num_bins} and {other.num_bins} bins")
        counts = other.counts
        if other.exponent is not None and (self.exponent is None or other.exponent > self.exponent):
            self._coarsen(other.exponent)
        elif other.exponent is not None and other.exponent < self.exponent:
            widened = Histogram(self.num_bins)
            widened.counts, widened.exponent = other.counts.copy(), other.exponent
            widened._coarsen(self.exponent)
            counts = widened.counts
        self.counts = self.counts + counts
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)
        self.total += other.total

    def magnitude(self) -> np.ndarray:
        """Counts of |x| in bins [k * width, (k + 1) * width), trimmed after the last non-empty bin."""
        folded = self.counts[0] + self.counts[1]
        nonzero = np.flatnonzero(folded)
        return folded[: nonzero[-1] + 1] if nonzero.size else folded[:0]

    def signed(self, group: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Counts over the real line and their ``len + 1`` edges, from -2N * width to 2N * width.

        ``group`` > 1 sums groups of that many bins on each side (exact; ``2 * num_bins`` must divide by it).
        """
        n = 2 * self.num_bins
        if n % group:
            raise ValueError(f"group must divide {n}, got {group}")
        sides = self.counts.reshape(2, n // group, group).sum(axis=2)
        counts = np.concatenate([sides[0, ::-1], sides[1]])
        edges = np.arange(-(n // group), n // group + 1, dtype=np.float64) * (self.width * group)
        return counts, edges

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            "counts": self.counts.copy(),
            "exponent": np.array(np.nan if self.exponent is None else self.exponent),
            "lo": np.array(self.lo),
            "hi": np.array(self.hi),
            "total": np.array(self.total),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        counts = np.asarray(state["counts"], dtype=np.int64)
        if counts.shape != (2, 2 * self.num_bins):
            raise ValueError(
                f"histogram state has counts of shape {counts.shape}, expected {(2, 2 * self.num_bins)} "
                f"for num_bins={self.num_bins}"
            )
        exponent = float(state["exponent"])
        self.counts = counts.copy()
        self.exponent = None if math.isnan(exponent) else int(exponent)
        self.lo, self.hi = float(state["lo"]), float(state["hi"])
        self.total = int(state["total"])
