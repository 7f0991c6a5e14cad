"""lowbit's vectorized entropy search agrees with a plain-loop reference of NVIDIA's reading of TensorRT's
algorithm (pytorch-quantization / ModelOpt ``_compute_amax_entropy``)."""

import functools
import math

import numpy as np
import pytest

from lowbit.calib import EntropyCalibrator, create
from lowbit.calib.search import entropy_amax, entropy_bins, kl_divergences, nvidia_zero_bin
from lowbit.errors import CalibrationError

from .reference_entropy import reference_entropy_bins, reference_kl, zero_binned


def _trt_histogram(x, bins=2048):
    """NVIDIA's histogram of one tensor: ``bins`` bins of |x| over [0, max|x|]."""
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
        "mixture": np.r_[rng.normal(0, 1, 30_000), rng.normal(6, 0.5, 3_000)],
        "sparse": np.r_[np.zeros(30_000), rng.exponential(size=2_000)],
    }


@pytest.mark.parametrize("name", list(_datasets()))
def test_every_divergence_equals_the_reference_loop(name):
    hist = zero_binned(_trt_histogram(_datasets()[name], bins=512)[0])
    candidates, kl = kl_divergences(hist)
    assert candidates[0] == 128 and candidates[-1] == len(hist)
    for i, ours in zip(candidates, kl, strict=True):
        ref = reference_kl(hist, int(i))
        assert (math.isinf(ref) and math.isinf(ours)) or ours == pytest.approx(ref, rel=1e-9, abs=1e-12), i


@functools.cache
def _reference_on_trt_histogram(name):
    """(hist, width, best_i, best_kl) on NVIDIA's 2048-bin histogram; the plain loop takes seconds."""
    hist, width = _trt_histogram(_datasets()[name])
    return (hist, width, *reference_entropy_bins(list(hist)))


# The whole 2048-bin search in the reference loop is O(bins^2): three shapes of data keep the suite fast.
FULL_SIZE = ["normal", "relu", "mixture"]


@pytest.mark.parametrize("name", FULL_SIZE)
def test_chosen_threshold_is_nvidias_on_the_same_2048_bin_histogram(name):
    hist, width, best_i, _ = _reference_on_trt_histogram(name)
    assert entropy_bins(hist) == best_i
    assert entropy_amax(hist, width) == best_i * width


@pytest.mark.parametrize("name", list(_datasets()))
def test_chosen_bins_are_nvidias_on_smaller_histograms(name):
    for bins in (160, 384):
        hist = _trt_histogram(_datasets()[name], bins=bins)[0]
        assert entropy_bins(hist) == reference_entropy_bins(list(hist))[0], bins


def test_the_three_places_nvidia_differs_from_the_slides():
    # 1. the zero bin takes bin 1's count: a spike of zeros does not drive the threshold
    spike = np.r_[1e6, np.linspace(100.0, 1.0, 400)]
    assert nvidia_zero_bin(spike)[0] == 100.0 and entropy_bins(spike) == entropy_bins(np.r_[100.0, spike[1:]])
    # 2. Q's empty bins are the histogram's: keeping 130 bins, whose last one is empty while the outliers fold
    #    into it, is infinitely bad (on the slides' reading P's non-empty bin gave Q mass there)
    hist = np.r_[np.full(129, 50.0), [0.0], np.full(70, 1.0)]
    candidates, kl = kl_divergences(hist)
    assert math.isinf(kl[candidates == 130][0]) and math.isfinite(kl[candidates == 131][0])
    # 3. ties go to the last candidate: past the data every candidate has the same divergence (0)
    flat = np.r_[np.full(128, 10.0), np.zeros(20)]
    assert entropy_bins(flat) == 148 == reference_entropy_bins(list(flat))[0]


def test_calibrator_equals_the_reference_on_its_histogram():
    x = _datasets()["laplace"]
    c = EntropyCalibrator()
    for batch in np.array_split(x, 7):
        c.update(batch)
    hist, width = c.trt_histogram()
    assert hist.size == 2048 and width == pytest.approx(np.abs(x).max() / 2048)
    assert hist[0] == hist[1]
    best_i, _ = reference_entropy_bins(list(hist))
    assert c.compute().hi == pytest.approx(min(best_i * width, np.abs(x).max()))
    assert c.compute().lo == -c.compute().hi


def test_streaming_calibrator_is_mostly_within_one_bin_of_nvidia_on_the_whole_data():
    # The streamed histogram, re-binned onto 2048 bins over [0, max|x|], is NVIDIA's histogram up to the spreading
    # of each fine bin (1/4 to 1/8 of a bin). Where the divergence has one clear minimum the thresholds agree to
    # within a bin; where two minima lie within ~1e-4 of each other, any histogram but the exact one may pick the
    # other (measured: 2 cases in 8 here, 70 and 162 bins off).
    off = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        shapes = {
            "half-normal": np.abs(rng.standard_normal(200_000)),
            "mixture": np.r_[rng.normal(0, 1, 200_000), rng.normal(6, 0.5, 20_000)],
            "relu": np.maximum(rng.standard_normal(200_000), 0),
            "laplace": rng.laplace(size=200_000),
        }
        for x in shapes.values():
            hist, width = _trt_histogram(x)
            c = create("entropy")
            for batch in np.array_split(x, 5):
                c.update(batch)
            off.append(abs(c.compute().hi / width - entropy_bins(hist)))
    assert sum(d <= 1 for d in off) >= 6, off
    assert max(off) <= 0.1 * 2048, off


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


def test_relu_outputs_keep_their_range_and_exclude_zeros_still_empties_bin_zero():
    """After a ReLU half the values are exact zeros. With bin 0 given bin 1's count, the search finds the range of
    the positive half as it would without the zeros (the slides' reading clipped it near 1.9 sigma)."""
    rng = np.random.default_rng(3)
    relu = np.maximum(rng.standard_normal(200_000), 0)
    positive = relu[relu > 0]
    nvidia, dropped, alone = EntropyCalibrator(), EntropyCalibrator(exclude_zeros=True), EntropyCalibrator()
    nvidia.update(relu)
    dropped.update(relu)
    alone.update(positive)
    assert 3.0 < nvidia.compute().hi <= relu.max()
    assert nvidia.compute().hi == pytest.approx(alone.compute().hi, rel=0.05)
    assert dropped.trt_histogram()[0][0] == 0 and 3.0 < dropped.compute().hi <= relu.max()
    with pytest.raises(CalibrationError, match="exclude_zeros"):
        EntropyCalibrator(exclude_zeros="yes")
