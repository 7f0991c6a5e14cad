from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.errors import CalibrationError, SpecError
from lowbit.torch.layers import QuantMixin
from tests.torch import models


def _layers(model, kind=lt.TensorQuantizer):
    return [m for m in model.modules() if isinstance(m, kind)]


def test_int8_ptq_folds_batchnorm_swaps_layers_and_keeps_the_outputs():
    model = models.convnet()
    data = models.batches()
    q = lt.quantize(model, "int8", calib=data, progress=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())  # folded
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    assert [type(m).__name__ for m in q.modules() if isinstance(m, QuantMixin)] == [
        "QuantConv2d", "QuantConv2d", "QuantLinear",
    ]  # fmt: skip
    assert all(qz.mode == "quantize" and qz.calibrated for qz in _layers(q))
    x = models.batches(1, seed=7)[0]
    ref, out = model(x), q(x)
    assert (ref - out).abs().max() < 0.05 * ref.abs().max()
    assert not torch.equal(ref, out)  # it is quantized


def test_folding_keeps_the_float_function():
    model = models.convnet()
    q = lt.quantize(model, "int8", calib=models.batches(), progress=False)
    for qz in _layers(q):
        qz.mode = "disabled"
    x = models.batches(1, seed=3)[0]
    torch.testing.assert_close(q(x), model(x), atol=1e-5, rtol=1e-4)


def test_a_conv_output_read_twice_is_not_folded():
    model = models.SharedConvOutput().eval()
    with pytest.warns(UserWarning, match="undone"):
        q = lt.quantize(model, "int8", calib=models.batches(), progress=False)
    assert isinstance(q.bn, nn.BatchNorm2d)
    for qz in _layers(q):
        qz.mode = "disabled"
    x = models.batches(1, seed=3)[0]
    torch.testing.assert_close(q(x), model(x))


def test_a_forward_loop_calibrates_like_the_batches():
    model, data = models.convnet(), models.batches()
    a = lt.quantize(model, "int8", calib=data, progress=False)

    def loop(m):
        for x in data:
            m(x)

    b = lt.quantize(model, "int8", calib=loop, progress=False)
    for qa, qb in zip(_layers(a), _layers(b), strict=True):
        torch.testing.assert_close(qa.scale, qb.scale)


def test_config_overrides_by_pattern():
    cfg = lt.preset("int8").override("8", None).override("0", lt.LayerConfig(input=None))
    q = lt.quantize(models.convnet(), cfg, calib=models.batches(), progress=False)
    assert type(q[8]) is nn.Linear  # left in float
    assert q[0].input_quantizer.mode == "disabled" and q[0].weight_quantizer.mode == "quantize"
    assert q[3].input_quantizer.mode == "quantize"


def test_w4a16_group128_is_weight_only_in_groups():
    model = nn.Sequential(nn.Linear(256, 8))
    q = lt.quantize(model, "w4a16_group128", progress=False)
    layer = q[0]
    assert layer.input_quantizer.mode == "disabled"
    assert tuple(layer.weight_quantizer.scale.shape) == (8, 2)
    w = layer.weight_quantizer(layer.weight)
    assert len(torch.unique(w[0, :128] / layer.weight_quantizer.scale[0, 0])) <= 16


def test_dynamic_ptq_needs_no_data():
    model = models.MLP()
    q = lt.quantize(model, "int8_dynamic", progress=False)
    assert all(layer.input_quantizer.dynamic for layer in [q.fc1, q.fc2])
    x = torch.randn(5, 16)
    assert (q(x) - model(x)).abs().max() < 0.05 * model(x).abs().max()


def test_bad_input_is_a_clear_error():
    model = models.convnet()
    with pytest.raises(CalibrationError, match="needs calibration data"):
        lt.quantize(model, "int8")
    with pytest.raises(SpecError, match="matches no quantizable layer"):
        lt.quantize(model, lt.preset("int8").override("encoder.*", None), calib=models.batches())
    with pytest.raises(SpecError, match="nothing to quantize"):
        lt.quantize(nn.Sequential(nn.ReLU()), "int8", calib=models.batches())
    with pytest.raises(SpecError, match=r"unknown quantization preset .int3.*int8"):
        lt.quantize(model, "int3", calib=models.batches())
    with pytest.raises(CalibrationError, match=r"calibration batch 0 failed.*shapes the model expects"):
        lt.quantize(model, "int8", calib=[torch.randn(2, 5, 16, 16)], progress=False)
    with pytest.raises(CalibrationError, match="no batch"):
        lt.quantize(model, "int8", calib=[], progress=False)


def test_qat_trains_with_learned_scales():
    torch.manual_seed(0)
    model = models.MLP()
    x = torch.randn(256, 16)
    y = (x[:, :4] * 2).argmax(1)
    act = lt.QuantizerConfig(bits=4, learn_scale=True)
    weight = lt.QuantizerConfig(bits=4, granularity="channel", learn_scale=True)
    q = lt.quantize(model, lt.Config(lt.LayerConfig(act, weight)), calib=[x[:64]], progress=False)
    scales = [p for n, p in q.named_parameters() if n.endswith("scale")]
    assert len(scales) == 4
    before = [s.detach().clone() for s in scales]
    q.train()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(q(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, scales, strict=True))


def test_with_learned_scales_reaches_overrides_but_not_dynamic_or_float_tensors():
    cfg = lt.preset("w4a4").override("fc2", lt.LayerConfig(lt.QuantizerConfig(dynamic=True), None))
    cfg = cfg.override("fc9", None).with_learned_scales()
    assert cfg.default.input.learn_scale and cfg.default.weight.learn_scale
    fc2 = cfg.for_layer("fc2")
    assert not fc2.input.learn_scale and fc2.weight is None
    assert cfg.for_layer("fc9") is None
    assert not cfg.with_learned_scales(False).default.input.learn_scale


def test_the_recipe_names_the_weight_rounding_and_the_keyword_wins():
    from dataclasses import replace

    from lowbit.recipe import preset

    calib = models.batches()
    by_recipe = lt.quantize(models.convnet(), replace(preset("w4a8"), rounding="gptq"), calib=calib, progress=False)
    by_keyword = lt.quantize(models.convnet(), "w4a8", calib=calib, rounding="gptq", progress=False)
    nearest = lt.quantize(models.convnet(), "w4a8", calib=calib, progress=False)
    overruled = lt.quantize(models.convnet(), replace(preset("w4a8"), rounding="gptq"), calib=calib,
                            rounding="nearest", progress=False)  # fmt: skip
    codes = [dict(lt.quantizers(q))["0.weight_quantizer"].codes for q in (by_recipe, by_keyword, nearest, overruled)]
    assert torch.equal(codes[0], codes[1]) and torch.equal(codes[2], codes[3]) and not torch.equal(codes[0], codes[2])
    names = r"adaround, awq, awq\+gptq, gptq, nearest, stochastic"
    with pytest.raises(SpecError, match=rf"rounding must be one of {names}, got 'up'"):
        lt.quantize(models.convnet(), replace(preset("int8"), rounding="up"), calib=calib, progress=False)
    with pytest.raises(SpecError, match=r"config\.fp16_rest is not used by lowbit\.torch"):
        lt.quantize(models.convnet(), replace(preset("int8"), fp16_rest=True), calib=calib, progress=False)


def test_a_quantized_model_is_in_eval_mode_down_to_its_quantizers():
    q = lt.quantize(models.convnet(), "w4a8", calib=models.batches(), progress=False)
    assert not any(m.training for m in q.modules())
