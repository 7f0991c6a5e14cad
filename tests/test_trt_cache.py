import numpy as np
import pytest

from lowbit.errors import FormatError
from lowbit.trt_cache import (
    format_trt_cache,
    hex_to_scale,
    parse_trt_cache,
    read_trt_cache,
    scale_to_hex,
    write_trt_cache,
)


def test_amax_one_is_3c010204():
    assert scale_to_hex(1 / 127) == "3c010204"
    assert format_trt_cache({"input": 1.0}) == "TRT-8601-EntropyCalibration2\ninput: 3c010204\n"


def test_round_trip_keeps_float32_scales_exactly(tmp_path):
    rng = np.random.default_rng(0)
    amax = {f"layer{i}/out:0": float(v) for i, v in enumerate(rng.uniform(1e-4, 1e3, 50))}
    amax["zero"] = 0.0
    path = tmp_path / "model.cache"
    write_trt_cache(path, amax, algorithm="MinMaxCalibration", version="10000")
    cache = read_trt_cache(path)
    assert (cache.algorithm, cache.version) == ("MinMaxCalibration", "10000")
    assert list(cache.scales) == list(amax)  # order kept; names with ':' and '/' survive
    for name, value in amax.items():
        assert cache.scales[name] == np.float32(np.float32(value) / np.float32(127))
        assert cache.amax()[name] == pytest.approx(value, rel=1e-6)


def test_reads_a_cache_as_tensorrt_writes_it():
    text = "TRT-8601-EntropyCalibration2\r\ninput_1: 3c010204\r\n(Unnamed Layer* 3) [Convolution]_output: 3d4ccccd"
    cache = parse_trt_cache(text)
    assert cache.scales["input_1"] == pytest.approx(1 / 127)
    assert cache.scales["(Unnamed Layer* 3) [Convolution]_output"] == pytest.approx(0.05)
    assert hex_to_scale("3d4ccccd") == np.float32(0.05)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "is empty"),
        ('{"input": 0.1}', r"line 1: expected a header like 'TRT-8601-EntropyCalibration2'"),
        ("TRT-8601-EntropyCalibration2\ninput 3c010204\n", r"line 2: expected 'tensor_name: 8 hex digits'"),
        ("TRT-8601-EntropyCalibration2\ninput: 3c0102\n", r"line 2"),
    ],
)
def test_bad_cache_text_is_a_clear_error(text, match):
    with pytest.raises(FormatError, match=match):
        parse_trt_cache(text)


def test_bad_values_are_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "out.cache"
    path.write_text("old")
    with pytest.raises(FormatError, match="amax must be a finite number"):
        write_trt_cache(path, {"a": 1.0, "b": float("nan")})
    with pytest.raises(FormatError, match="unknown TensorRT calibration algorithm"):
        write_trt_cache(path, {"a": 1.0}, algorithm="KL")
    with pytest.raises(FormatError, match="cannot be written"):
        write_trt_cache(path, {"a\nb": 1.0})
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.cache"]
    binary = tmp_path / "engine.plan"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FormatError, match="not a text TensorRT calibration cache"):
        read_trt_cache(binary)
