"""Power-of-two scales (--scale pow2) and stochastic weight rounding (--rounding stochastic) in the ONNX front end."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lowbit.cli import main
from lowbit.onnx import Options
from lowbit.onnx.pipeline import quantize
from lowbit.onnx.settings import QuantizeError, Settings, edit
from lowbit.recipe import preset
from lowbit.trt_cache import read_trt_cache
from tests.onnx import models


def _qdq_scales(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ops = ("QuantizeLinear", "DequantizeLinear")
    return [inits[n.input[1]] for n in model.graph.node if n.op_type in ops]


def _is_pow2(scale) -> bool:
    mantissa, _ = np.frexp(np.asarray(scale, np.float32))
    return bool(np.all(mantissa == 0.5))


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_every_scale_of_the_model_and_of_the_cache_is_a_power_of_two(tmp_path, target):
    path = models.save(models.convnet(), tmp_path / "m.onnx")
    calib = models.calib_data(tmp_path / "c.npz", (3, 16, 16))
    out, cache = tmp_path / "q.onnx", tmp_path / "q.cache"
    args = ["quantize", path, "-o", str(out), "--calib", calib, "--scale", "pow2", "--target", target, "-q"]
    assert main([*args, "--trt-cache", str(cache)]) == 0
    scales = _qdq_scales(onnx.load(str(out)))
    assert len(scales) >= 6 and all(_is_pow2(s) for s in scales)  # activations, weights and int32 biases
    assert all(_is_pow2(s) for s in read_trt_cache(cache).scales.values())
    x = np.load(calib)["x"][:4]
    float_out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    quant_out = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cos = float((float_out * quant_out).sum() / np.linalg.norm(float_out) / np.linalg.norm(quant_out))
    assert cos > 0.99


def test_float_scales_are_not_powers_of_two_by_default(tmp_path):
    path = models.save(models.convnet(), tmp_path / "m.onnx")
    calib = models.calib_data(tmp_path / "c.npz", (3, 16, 16))
    assert main(["quantize", path, "-o", str(tmp_path / "q.onnx"), "--calib", calib, "-q"]) == 0
    assert not all(_is_pow2(s) for s in _qdq_scales(onnx.load(str(tmp_path / "q.onnx"))))


def _pow2_weights_only():
    layer = preset("int8").default
    return replace(preset("int8"), default=replace(layer, weight=replace(layer.weight, scale="pow2")))


def _stochastic_in_training():
    layer = preset("int8").default
    return replace(preset("int8"), default=replace(layer, weight=replace(layer.weight, rounding="stochastic")))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: edit(preset("int8"), scale="pow2", refine="easyquant"), "refine 'easyquant' searches scales by"),
        (lambda: edit(preset("int8"), scale="pow2", dynamic=True), "scale 'pow2' needs static quantization"),
        (_pow2_weights_only, "one scale kind for the whole model"),
        (_stochastic_in_training, "the ONNX front end draws weight codes so with --rounding stochastic"),
    ],
)
def test_what_pow2_cannot_do_is_a_one_line_error(make, message):
    with pytest.raises(QuantizeError, match=message):
        Settings.of(make())


def test_a_number_after_scale_points_to_pixel_scale(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "m.onnx", "-o", str(tmp_path / "q.onnx"), "--scale", "0.0039"])
    assert "--pixel-scale" in capsys.readouterr().err


def _weight_codes(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {
        n.input[0]: inits[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].dtype == np.int8
    }


def test_stochastic_rounding_is_floor_or_ceil_of_nearest_seeded_and_repeatable(tmp_path):
    path = models.save(models.convnet(), tmp_path / "m.onnx")
    calib = models.calib_data(tmp_path / "c.npz", (3, 16, 16))
    codes = {}
    for rounding in ("nearest", "stochastic", "stochastic"):
        out = tmp_path / f"{rounding}{len(codes)}.onnx"
        config = edit(preset("int8"), rounding=rounding, bias_correction=False)
        quantize(path, out, calib, config, options=Options(compare=False, progress=False))
        codes[f"{rounding}{len(codes)}"] = _weight_codes(onnx.load(str(out)))
    nearest, first, again = codes.values()
    assert set(nearest) == set(first) and nearest
    for name in nearest:
        np.testing.assert_array_equal(first[name], again[name])  # seeded
        assert np.abs(first[name].astype(int) - nearest[name]).max() <= 1
    assert any((first[n] != nearest[n]).any() for n in nearest)
