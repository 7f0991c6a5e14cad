"""AdaRound: weight codes learned layer by layer on the quantized model's inputs (lowbit.torch.rounding.adaround)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowbit.torch as lt
from lowbit.errors import CalibrationError
from lowbit.torch.rounding.adaround import Sample
from tests.torch import models

LAYERS = pytest.mark.parametrize(
    "layer", list(models.roundable_geometries().values()), ids=list(models.roundable_geometries())
)


@LAYERS
def test_sampled_patches_times_the_weight_give_the_layer_output_at_the_sampled_positions(layer):
    x = models.layer_input(layer, torch.Generator().manual_seed(0))
    sample = Sample(layer, 10, seed=1)
    with torch.no_grad():
        y = layer(x)
        patches = sample.patches(x, batch=0)  # (rows, groups, columns)
        target = sample.output(y, batch=0)  # (rows, channels)
    groups = getattr(layer, "groups", 1)
    w = layer.weight.reshape(groups, layer.weight.shape[0] // groups, -1)
    out = torch.einsum("rgk,gok->rgo", patches, w).reshape(len(patches), -1) + layer.bias
    assert len(patches) == 10
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample.patches(x, batch=0), patches)  # the same positions on every pass
    assert not torch.equal(sample.positions(1, 100), sample.positions(0, 100))


def test_adaround_lowers_the_output_error_on_new_data_keeps_scales_and_rounds_each_weight_up_or_down():
    model = models.rounding_net()
    calib = list(models.smooth_images(256).split(32))
    test = models.smooth_images(128, seed=1)
    with torch.no_grad():
        ref = model(test)
    errors, quantized = {}, {}
    for rounding in ("nearest", "adaround"):
        q = lt.quantize(model, "w4a8", calib=calib, rounding=rounding, progress=False)
        with torch.no_grad():
            errors[rounding] = float(((q(test) - ref) ** 2).mean())
        quantized[rounding] = q
    assert errors["adaround"] < 0.7 * errors["nearest"]
    near, learned = lt.quantizers(quantized["nearest"]), lt.quantizers(quantized["adaround"])
    codes = models.weight_codes(quantized["adaround"])
    assert set(codes) == {f"{i}.weight_quantizer" for i in (0, 2, 4, 7)}
    for name, c in codes.items():
        torch.testing.assert_close(learned[name].scale, near[name].scale, rtol=0, atol=0)  # only the codes change
        layer = quantized["adaround"].get_submodule(name.rsplit(".", 1)[0])
        scale = learned[name].scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
        floor = torch.floor(layer.weight.detach() / scale)
        spec = learned[name].spec
        up = c - floor.clamp(spec.qmin, spec.qmax)
        assert bool(((up == 0) | (up == 1)).all())  # each weight on one of its two neighbouring codes
        nearest = torch.round(layer.weight.detach() / scale).clamp(spec.qmin, spec.qmax)
        assert not torch.equal(c.float(), nearest)  # and the choice is not plain rounding


def test_adaround_reports_errors_per_layer_and_rounds_only_the_named_layers():
    model = models.rounding_net()
    calib = list(models.smooth_images(64).split(32))
    q = lt.quantize(model, "w4a8", calib=calib, progress=False)
    errors = lt.adaround(q, calib, names=["2"], iterations=50, progress=False)
    assert list(errors) == ["2"]
    before, after = errors["2"]
    assert 0 <= after <= before
    assert set(models.weight_codes(q)) == {"2.weight_quantizer"}


def test_with_drop_1_the_codes_are_learned_on_the_float_models_inputs_whatever_runs_upstream():
    # QDrop: each input element comes from the float model with probability `drop`. At drop=1 the codes of layer 2
    # cannot depend on how layer 0 is quantized; at drop=0 (AdaRound's own objective) they absorb its error.
    model = models.rounding_net()
    calib = list(models.smooth_images(64).split(32))
    wide_first = lt.preset("w4a8").override(
        "0", lt.LayerConfig(lt.QuantizerConfig(method="mse"), lt.QuantizerConfig(bits=8, granularity="channel"))
    )
    codes = {}
    for drop in (0.0, 1.0):
        inputs = None
        for name, config in (("w4", "w4a8"), ("w8", wide_first)):
            q = lt.quantize(model, config, calib=calib, progress=False)
            quantizer = lt.quantizers(q)["2.input_quantizer"]
            if inputs is None:
                inputs = quantizer.scale.clone(), quantizer.zero_point.clone()
            quantizer.scale.data, quantizer.zero_point.data = inputs  # calibration saw layer 0's error: undo that
            lt.adaround(q, calib, names=["2"], iterations=100, drop=drop, progress=False)
            codes[drop, name] = models.weight_codes(q)["2.weight_quantizer"]
    assert torch.equal(codes[1.0, "w4"], codes[1.0, "w8"])
    layer, weight_quantizer = q.get_submodule("2"), lt.quantizers(q)["2.weight_quantizer"]
    spec, scale = weight_quantizer.spec, weight_quantizer.scale.reshape(-1, 1, 1, 1)
    nearest = torch.round(layer.weight.detach() / scale).clamp(spec.qmin, spec.qmax)
    assert not torch.equal(codes[1.0, "w4"].float(), nearest)  # learned, not plain rounding kept by the guard
    assert not torch.equal(codes[0.0, "w4"], codes[0.0, "w8"])
    with pytest.raises(CalibrationError, match="drop must be"):
        lt.adaround(q, calib, drop=1.5, progress=False)


def test_adaround_asks_for_batches_and_names_it_can_round():
    model = models.rounding_net()
    calib = list(models.smooth_images(64).split(32))
    q = lt.quantize(model, "w4a8", calib=calib, progress=False)
    with pytest.raises(CalibrationError, match="not a forward loop"):
        lt.adaround(q, lambda m: [m(b) for b in calib], progress=False)
    with pytest.raises(CalibrationError, match="cannot round nope"):
        lt.adaround(q, calib, names=["nope"], progress=False)
    with pytest.raises(CalibrationError, match="calib is empty"):
        lt.adaround(q, [], progress=False)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        lt.quantize(model, "w4a8", rounding="adaround", progress=False)
    runs = []
    with pytest.raises(CalibrationError, match="not a forward loop"):
        lt.quantize(model, "w4a8", calib=lambda m: runs.append([m(b) for b in calib]), rounding="adaround")
    assert runs == []  # said before calibrating, not after


def test_adarounded_model_exports_with_its_codes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = models.rounding_net()
    calib = list(models.smooth_images(128).split(32))
    q = lt.quantize(model, "int8", calib=calib, rounding="adaround", progress=False)
    x = models.smooth_images(4, seed=5)
    path = tmp_path / "m.onnx"
    lt.export_onnx(q, x, path)
    with torch.no_grad():
        expected = q(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    step = float(abs(expected).max()) / 127
    assert float(abs(got - expected).max()) <= step
    assert F.mse_loss(torch.from_numpy(got), torch.from_numpy(expected)) < 1e-3


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, about speed
def test_same_padding_with_an_even_kernel_is_a_clear_error_for_both_roundings():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2, padding="same")).eval()
    calib = list(models.smooth_images(16).split(8))
    for rounding, method in (("gptq", "GPTQ"), ("adaround", "AdaRound")):
        with pytest.raises(CalibrationError, match=f"{method} cannot follow padding='same' with an even kernel"):
            lt.quantize(model, "w4a8", calib=calib, rounding=rounding, progress=False)
