"""Ternary and log2 number formats in core, against plain-loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowbit.core import QuantSpec, dequantize, qparams, qparams_from_tensor, quantize
from lowbit.core.formats.log2 import log2_codes
from lowbit.errors import SpecError


def _twn_reference(row: np.ndarray) -> tuple[list[int], float]:
    delta = 0.7 * sum(abs(v) for v in row) / len(row)
    codes = [(1 if v > 0 else -1) if abs(v) > delta else 0 for v in row]
    kept = [abs(v) for v, c in zip(row, codes, strict=True) if c]
    return codes, sum(kept) / len(kept)


def test_ternary_matches_twn_per_channel():
    w = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    spec = QuantSpec(bits=2, format="ternary", axis=0)
    scale, zp = qparams_from_tensor(w, spec)
    codes = quantize(w, scale, zp, spec)
    for i, row in enumerate(w):
        ref_codes, ref_scale = _twn_reference(row.astype(np.float64))
        assert codes[i].tolist() == ref_codes
        assert scale[i] == pytest.approx(ref_scale, rel=1e-5)
    np.testing.assert_allclose(dequantize(codes, scale, zp, spec), codes * scale[:, None], rtol=1e-6)


def test_ternary_refuses_other_bits_and_ranges():
    with pytest.raises(SpecError, match="bits=2"):
        QuantSpec(bits=3, format="ternary")
    with pytest.raises(SpecError, match="from the weight itself"):
        qparams(-1.0, 1.0, QuantSpec(bits=2, format="ternary"))


def _log2_reference(v: float, s: float, bits: int) -> float:
    """The nearest of 0 and +-s * 2^-k, k = 0..M-1 (ties to the smaller magnitude), by search."""
    m = 2 ** (bits - 1) - 1
    candidates = [0.0] + [s * 2.0 ** (-k) for k in range(m)]
    target = min(abs(v), s)
    best = min(candidates, key=lambda c: (abs(target - c), c))
    return math.copysign(best, v)


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_log2_linear_rounding_is_the_nearest_power(bits):
    x = np.random.default_rng(bits).normal(size=400).astype(np.float32) * 0.5
    spec = QuantSpec(bits=bits, format="log2")
    s, z = qparams(-1.0, 1.0, spec)
    got = dequantize(quantize(x, s, z, spec), s, z, spec)
    assert got.tolist() == [_log2_reference(float(v), 1.0, bits) for v in x]


def test_log2_code_table_and_log_domain():
    spec = QuantSpec(bits=4, format="log2")
    codes = np.arange(-7, 8, dtype=np.int8)
    values = dequantize(codes, 2.0, 0, spec)
    assert values[7] == 0 and values[14] == 2.0 and values[8] == 2.0 / 64 and values[0] == -2.0
    # 0.72 lies nearer 0.5 than 1 (linear) but above sqrt(0.5) (log domain): the two rules differ there
    assert log2_codes(np.array([0.72]), 1.0, spec, "linear").tolist() == [6]
    assert log2_codes(np.array([0.72]), 1.0, spec, "log").tolist() == [7]


def test_log2_pow2_scale_rounds_up():
    scale, _ = qparams(np.array([-0.3, -0.5]), np.array([0.2, 0.9]), QuantSpec(bits=4, format="log2", axis=0,
                                                                               scale_kind="pow2"))  # fmt: skip
    assert scale.tolist() == [0.5, 1.0]
