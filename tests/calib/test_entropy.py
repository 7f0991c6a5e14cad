"""lowbit's vectorized entropy search agrees with a plain-loop reference of TensorRT's algorithm."""

import functools
import math

import numpy as np
import pytest

from lowbit.calib import EntropyCalibrator, create
from lowbit.calib.search import entropy_amax, kl_divergences
from lowbit.errors import CalibrationError

from .reference_entropy import reference_entropy_bins, reference_kl


def _trt_histogram(x, bins=2048):
    a = np.abs(np.asarray(x, np.float64))
    hist, edges = np.histogram(a, bins=bins, range=(0, a.max()))
    return hist, edges[1] - edges[0]


@functools.cache
def _datasets():
    rng = np.random.default_rng(0)
    return {
        "normal": rng.standard_normal(40_000),
        "laplace": rng.laplace(size=40_000),
        "relu": np.maximum(rng.standard_normal(40_000), 0),
        "outliers": np.r_[rng.standard_normal(40_000) * 0.01, [5.0, 7.0]],
        "gap": np.r_[rng.uniform(0, 1, 5000), rng.uniform(3.9, 4, 3)],
        "student_t": rng.standard_t(3, 40_000),
    }


@pytest.mark.parametrize("name", list(_datasets()))
def test_every_divergence_equals_the_reference_loop(name):
    hist, _ = _trt_histogram(_datasets()[name], bins=512)
    candidates, kl = kl_divergences(hist)
    assert candidates[0] == 128 and candidates[-1] == np.flatnonzero(hist)[-1] + 1
    for i, ours in zip(candidates, kl, strict=False):
        ref = reference_kl(list(hist), int(i))
        assert (math.isinf(ref) and math.isinf(ours)) or ours == pytest.approx(ref, rel=1e-9, abs=1e-12), i


@functools.cache
def _reference_on_trt_histogram(name):
    """(hist, width, best_i, best_kl) on TensorRT's 2048-bin histogram; the plain loop takes seconds."""
    hist, width = _trt_histogram(_datasets()[name])
    return (hist, width, *reference_entropy_bins(list(hist)))


# The whole 2048-bin search in the reference loop is O(bins^2): two shapes of data keep the suite fast.
FULL_SIZE = ["normal", "student_t"]


@pytest.mark.parametrize("name", FULL_SIZE)
def test_chosen_threshold_equals_the_reference_on_tensorrt_histograms(name):
    hist, width, best_i, best_kl = _reference_on_trt_histogram(name)
    candidates, kl = kl_divergences(hist)
    ours = int(candidates[np.argmin(kl)])
    # Equal, or a tie within rounding (the reference's own divergence at our choice is as small).
    assert ours == best_i or reference_kl(list(hist), ours) <= best_kl * (1 + 1e-12)
    assert entropy_amax(hist, width) == pytest.approx(ours * width)


def test_calibrator_equals_the_reference_on_its_tensorrt_histogram():
    x = _datasets()["laplace"]
    c = EntropyCalibrator()
    for batch in np.array_split(x, 7):
        c.update(batch)
    hist, width = c.trt_histogram()
    assert hist.size == 2048 and width == pytest.approx(np.abs(x).max() / 2048)
    assert hist.sum() == pytest.approx(x.size)
    best_i, _ = reference_entropy_bins(list(hist))
    assert c.compute().hi == pytest.approx(best_i * width)
    assert c.compute().lo == -c.compute().hi


@pytest.mark.parametrize("name", FULL_SIZE)
def test_streaming_calibrator_is_close_to_tensorrt_on_the_whole_data(name):
    # The streamed histogram, re-binned onto TensorRT's 2048 bins over [0, max|x|], is that histogram up to
    # the spreading of each fine bin (1/4 to 1/8 of a TensorRT bin): the thresholds agree to within a bin or two.
    x = _datasets()[name]
    _, width, best_i, _ = _reference_on_trt_histogram(name)
    c = create("entropy")
    for batch in np.array_split(x, 5):
        c.update(batch)
    assert abs(c.compute().hi - best_i * width) <= 2 * width


def test_threshold_clips_heavy_tails_and_never_exceeds_max():
    rng = np.random.default_rng(3)
    x = rng.standard_t(3, 200_000)
    c = create("entropy")
    c.update(x)
    amax = c.compute().hi
    assert 5 < amax < 0.5 * np.abs(x).max()
    thresholds, kl = c.divergences()
    assert thresholds.shape == kl.shape and thresholds[np.argmin(kl)] == pytest.approx(amax)
    narrow = create("entropy", num_bins=64, num_levels=32)
    narrow.update(np.array([0.5, -0.25]))
    assert narrow.compute().hi <= 0.5


def test_isolated_outliers_far_from_the_data_are_kept_as_tensorrt_does():
    # Every candidate below the outliers puts their mass into a last level whose Q is empty: KL = inf.
    rng = np.random.default_rng(3)
    c = create("entropy")
    c.update(np.r_[rng.standard_normal(100_000), [80.0, -90.0]])
    assert c.compute().hi >= 80.0


def test_exclude_zeros_keeps_the_range_of_relu_outputs():
    """After a ReLU half the values are exact zeros: TensorRT's KL clips the positive half near 1.9 sigma, while
    leaving the zero bin out finds the range |x| has without the zeros (about 4.3 sigma)."""
    rng = np.random.default_rng(3)
    relu = np.maximum(rng.standard_normal(200_000), 0)
    faithful, aware = EntropyCalibrator(), EntropyCalibrator(exclude_zeros=True)
    for c in (faithful, aware):
        c.update(relu)
    assert faithful.compute().hi < 2.2
    assert 3.5 < aware.compute().hi <= relu.max()
    magnitude = np.abs(rng.standard_normal(200_000))  # no zero spike: the choice barely moves
    plain, reference = EntropyCalibrator(exclude_zeros=True), EntropyCalibrator()
    for c in (plain, reference):
        c.update(magnitude)
    assert plain.compute().hi == pytest.approx(reference.compute().hi, rel=0.02)
    with pytest.raises(CalibrationError, match="exclude_zeros"):
        EntropyCalibrator(exclude_zeros="yes")
