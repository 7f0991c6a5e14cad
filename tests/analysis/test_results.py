"""The result types: a mixed-precision result's note on how noisy its score is."""

from __future__ import annotations

import pytest

from lowbit import analysis


def test_standard_error_of_a_percentage():
    assert analysis.standard_error_points(97.0, 256) == pytest.approx(1.0662, abs=1e-4)
    assert analysis.standard_error_points(97.0, 1024) == pytest.approx(analysis.standard_error_points(97.0, 256) / 2)
    assert analysis.standard_error_points(100.0, 100) > 0  # one sample's worth, never 0
    quiet = analysis.MixedResult("agreement", " %", 100.0, 3.0, samples=1000)
    assert "one standard error is 0.54 points" in quiet.noise_note() and "Evaluate" not in quiet.noise_note()
    exact = analysis.MixedResult("agreement", " %", 100.0, 0.0, [analysis.Step(0, None, 100.0, 0.0)], True, samples=10)
    assert "standard error" in exact.table() and "Evaluate" not in exact.table()  # no budget to weigh noise against
