"""GPTQ rounding of quantized PyTorch models (lowbit.torch.rounding.gptq; lt.gptq)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit.torch as lt
from lowbit.errors import CalibrationError, SpecError
from lowbit.torch.rounding.gptq import LayerMoment
from lowbit.torch.switches import kept_float, wider_weights
from tests.torch import models

LAYERS = pytest.mark.parametrize(
    "layer", list(models.roundable_geometries().values()), ids=list(models.roundable_geometries())
)


@LAYERS
def test_second_moment_gives_the_output_energy_of_any_weight(layer):
    """sum over outputs of (dW r)^2 = tr(dW H dW^T) * rows: checked against torch's own convolution, for a
    random weight change dW, so the patches H is made of are the ones the layer multiplies."""
    g = torch.Generator().manual_seed(0)
    x = models.layer_input(layer, g)
    moment = LayerMoment(layer)
    moment(layer, (x[:2],))
    moment(layer, (x[2:],))
    dw = torch.randn(layer.weight.shape, generator=g, dtype=torch.float64)
    if isinstance(layer, nn.Linear):
        out = x.double() @ dw.T
    else:
        conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
        out = conv(x.double(), dw, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    groups = getattr(layer, "groups", 1)
    m = dw.reshape(groups, dw.shape[0] // groups, -1)
    energy = float(torch.einsum("grd,gde,gre->", m, moment.moment.sum, m))
    assert energy == pytest.approx(float((out**2).sum()), rel=1e-5)  # float32 products, float64 sums
    rows_per_output = out.numel() // out.shape[1 if not isinstance(layer, nn.Linear) else -1]
    assert moment.moment.count == rows_per_output
    assert isinstance(moment.moment.sum, torch.Tensor) and moment.moment.sum.dtype == torch.float64  # not moved off


def test_gptq_lowers_the_output_error_on_new_data_and_keeps_scales():
    model = models.rounding_net()
    calib = list(models.smooth_images(256).split(32))
    test = models.smooth_images(128, seed=1)
    with torch.no_grad():
        ref = model(test)
    errors, scales = {}, {}
    for rounding in ("nearest", "gptq"):
        q = lt.quantize(model, "w4a8", calib=calib, rounding=rounding, progress=False)
        with torch.no_grad():
            errors[rounding] = float(((q(test) - ref) ** 2).mean())
        scales[rounding] = {n: t.scale.clone() for n, t in lt.quantizers(q).items() if t.is_weight}
    assert errors["gptq"] < 0.8 * errors["nearest"]
    for n, s in scales["nearest"].items():
        torch.testing.assert_close(scales["gptq"][n], s, rtol=0, atol=0)  # only the codes change
    codes = models.weight_codes(q)
    assert set(codes) == {f"{i}.weight_quantizer" for i in (0, 2, 4, 7)}
    for name, c in codes.items():
        spec = lt.quantizers(q)[name].spec
        assert c.shape == q.get_submodule(name.rsplit(".", 1)[0]).weight.shape
        assert int(c.min()) >= spec.qmin and int(c.max()) <= spec.qmax


def test_kept_float_layers_run_their_original_weights_and_wider_weights_restore_the_codes():
    model = models.rounding_net()
    calib = list(models.smooth_images(256).split(32))
    q = lt.quantize(model, "w4a8", calib=calib, rounding="gptq", progress=False)
    x = models.smooth_images(4, seed=2)
    with torch.no_grad(), kept_float(q, ["0", "2", "4", "7"]):
        torch.testing.assert_close(q(x), model(x))
    before, layer = models.weight_codes(q), q[2]
    with torch.no_grad():
        out = q(x)
    with wider_weights(q, ["2"]):
        assert layer.weight_quantizer.spec.bits == 8 and not layer.weight_quantizer.has_codes
    after = models.weight_codes(q)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(q(x), out, rtol=0, atol=0)
    layer.weight_quantizer.set_range(-1.0, 1.0)  # a new scale: the codes no longer apply
    assert not layer.weight_quantizer.has_codes


def test_codes_survive_state_dict_and_export_and_training_drops_them(tmp_path):
    model = models.rounding_net()
    calib = list(models.smooth_images(256).split(32))
    q = lt.quantize(model, "w4a8", calib=calib, rounding="gptq", progress=False)
    x = models.smooth_images(3, seed=4)
    with torch.no_grad():
        expected = q(x)
    fresh = lt.quantize(model, "w4a8", calib=calib, progress=False)
    fresh.load_state_dict(q.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    path = lt.export_onnx(q, x, tmp_path / "gptq.onnx")
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    q.train()
    q(x)  # a QAT step: the weight will change, the codes no longer fit it
    assert not models.weight_codes(q)


def test_gptq_on_a_quantized_model_and_bad_input():
    model = models.convnet()
    q = lt.quantize(model, "w4a8", calib=models.batches(), progress=False)
    with pytest.raises(CalibrationError, match="cannot round nope"):
        lt.gptq(q, models.batches(), names=["nope"])
    assert lt.gptq(q, models.batches(8), names=["0"], progress=False) == ["0"]
    # One batch of 8 images: 8 rows for the Linear's 8 inputs, too few to know H; the convs see 256 patches each.
    assert lt.gptq(q, models.batches(1), progress=False) == ["0", "3"]
    with pytest.raises(SpecError, match="rounding must be one of"):
        lt.quantize(model, "w4a8", calib=models.batches(), rounding="adaquant")
    with pytest.raises(CalibrationError, match="needs calibration data"):
        lt.quantize(model, "w4a16_group128", rounding="gptq")
    one_shot = iter(models.batches(8))  # read twice: calibration, then GPTQ's statistics
    g = lt.quantize(model, "w4a8", calib=one_shot, rounding="gptq", progress=False)
    assert models.weight_codes(g)
    with pytest.raises(CalibrationError, match="codes outside"):
        g[0].weight_quantizer.set_codes(torch.full(g[0].weight.shape, 9))
