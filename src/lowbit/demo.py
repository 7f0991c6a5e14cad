"""Synthetic activations with the shapes real networks produce, for a self-contained calibration demo.

Seeded, so every run prints the same table. Each tensor is a re-iterable stream of batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from lowbit.data import Batches

_SHAPE = (8, 64, 16, 16)  # batch of 8 feature maps, 131,072 values


def _stream(seed: int, make, num_batches: int) -> Batches:
    def batches() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        for _ in range(num_batches):
            yield make(rng).astype(np.float32)

    return Batches(batches, num_batches)


def demo_tensors(num_batches: int = 32) -> dict[str, Batches]:
    """Three kinds of activation that need different calibration:

    - ``conv_relu``: post-ReLU feature maps (one-sided, long right tail);
    - ``attention_scores``: heavy-tailed logits (Student-t, 3 degrees of freedom);
    - ``residual_sum``: Gaussian sums with rare large outliers (0.01% of values at 20-40 sigma).
    """

    def conv_relu(rng):
        return np.maximum(rng.gamma(1.5, 1.0, _SHAPE) - 1.0, 0.0) * rng.lognormal(0, 0.3, (1, 64, 1, 1))

    def attention_scores(rng):
        return rng.standard_t(3, _SHAPE) * 2.0

    def residual_sum(rng):
        x = rng.standard_normal(_SHAPE)
        hits = rng.random(_SHAPE) < 1e-4
        return np.where(hits, rng.uniform(20, 40, _SHAPE) * rng.choice([-1, 1], _SHAPE), x)

    return {
        "conv_relu": _stream(1, conv_relu, num_batches),
        "attention_scores": _stream(2, attention_scores, num_batches),
        "residual_sum": _stream(3, residual_sum, num_batches),
    }
