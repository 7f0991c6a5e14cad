"""Power-of-two scales (QuantizerConfig(scale="pow2")) and stochastic rounding (QuantizerConfig(rounding=
"stochastic") in training, rounding="stochastic" for PTQ weights) in the PyTorch front end."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import lowbit.torch as lt
from lowbit.core import QuantSpec
from lowbit.errors import CalibrationError
from lowbit.torch import TensorQuantizer
from tests.torch import models


def _is_pow2(t) -> bool:
    mantissa, _ = np.frexp(np.asarray(t, np.float32))
    return bool(np.all(mantissa == 0.5))


def _scales(model) -> list[torch.Tensor]:
    return [q.scale.detach() for q in lt.quantizers(model).values() if q.mode == "quantize"]


def test_ptq_with_pow2_scales_gives_and_exports_powers_of_two(tmp_path):
    model = models.convnet()
    config = lt.preset("int8").with_scale("pow2")
    q = lt.quantize(model, config, calib=models.batches(), progress=False)
    scales = _scales(q)
    assert scales and all(_is_pow2(s) for s in scales)
    x = models.batches(1, seed=9)[0]
    assert torch.nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0) > 0.98
    out = tmp_path / "q.onnx"
    lt.export_onnx(q, x[:1], out)
    proto = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    dq = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    assert dq and all(_is_pow2(s) for s in dq)


def test_learned_pow2_scales_learn_the_exponent_and_stay_powers_of_two():
    torch.manual_seed(0)
    q = TensorQuantizer(QuantSpec(bits=4, scale_kind="pow2"), learn_scale=True)
    q.set_range(-64.0, 64.0)  # far too coarse for data in [-1, 1]: the exponent should come down
    q.mode = "quantize"
    assert q.scale.item() == 16.0 and q.log2_scale.item() == 4.0
    assert [n for n, _ in q.named_parameters()] == ["log2_scale"]
    opt = torch.optim.Adam(q.parameters(), lr=0.1)
    q.train()
    for _ in range(150):
        x = torch.rand(256) * 2 - 1
        loss = ((q(x) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    _ = q(torch.zeros(1))
    assert _is_pow2(q.scale) and q.scale.item() <= 0.25
    assert q.scale.item() == 2.0 ** round(q.log2_scale.item())


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_stochastic_fake_quant_is_noisy_and_unbiased_in_training_nearest_in_eval(rounding):
    torch.manual_seed(0)
    q = TensorQuantizer(QuantSpec(bits=4, rounding=rounding))
    q.set_range(-8.0, 8.0)  # scale 8/7
    q.mode = "quantize"
    x = torch.full((20000,), 0.3)  # 0.2625 steps: nearest gives 0, stochastic 0 or one step
    q.train()
    out = q(x)
    q.eval()
    np.testing.assert_array_equal(q(x).numpy(), np.zeros(20000, np.float32))
    if rounding == "nearest":
        assert bool((out == 0).all())
    else:
        np.testing.assert_allclose(np.unique(out.numpy()), [0.0, 8 / 7], rtol=1e-6)
        assert abs(out.mean().item() - 0.3) < 0.02
    x = torch.linspace(-1, 1, 11, requires_grad=True)
    q.train()
    q(x).sum().backward()  # straight through
    np.testing.assert_array_equal(x.grad.numpy(), np.ones(11, np.float32))


def test_ptq_stochastic_weight_rounding_is_seeded_and_within_one_code_of_nearest():
    model, calib = models.convnet(), models.batches()
    config = replace(lt.preset("w4a8"), rounding="stochastic")
    first = lt.quantize(model, config, calib=calib, progress=False)
    again = lt.quantize(model, config, calib=calib, progress=False)
    nearest = lt.quantize(model, "w4a8", calib=calib, progress=False)
    layers = {n: m for n, m in first.named_modules() if getattr(m, "weight_quantizer", None) is not None}
    coded = [n for n, m in layers.items() if m.weight_quantizer.has_codes]
    assert coded
    changed = 0
    for name in coded:
        a = layers[name].weight_quantizer.codes
        b = dict(again.named_modules())[name].weight_quantizer.codes
        w = dict(nearest.named_modules())[name]
        q = w.weight_quantizer
        near = torch.round(w.weight / lt.quantizer.param_view(q.scale, w.weight.shape, q.spec))
        assert torch.equal(a, b)
        assert (a - near).abs().max() <= 1
        changed += int((a != near).sum())
    assert changed > 0


def test_easyquant_refuses_pow2_scales():
    q = lt.quantize(models.convnet(), lt.preset("int8").with_scale("pow2"), calib=models.batches(), progress=False)
    with pytest.raises(CalibrationError, match="not powers of two"):
        lt.easyquant(q, models.batches(), progress=False)


def test_a_recipe_with_pow2_and_stochastic_round_trips(tmp_path):
    from lowbit.recipe import load, save

    config = lt.preset("int8").with_scale("pow2")
    config = replace(
        config, default=replace(config.default, input=replace(config.default.input, rounding="stochastic"))
    )
    save(config, tmp_path / "r.json")
    assert load(tmp_path / "r.json") == config
