"""GPTQ in lowbit.torch with act-order and per-group scales fitted as it goes (Config.act_order; group
quantizers), checked against lowbit.core.gptq fed with a second moment computed here by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.core.gptq import round_groups, round_matrix
from lowbit.recipe import Config, LayerConfig, QuantizerConfig


def _linear_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 12)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    scales = torch.rand(32, generator=g) * 3 + 0.1  # inputs of unequal energy: act-order has an order to follow
    calib = [torch.randn(64, 32, generator=g) * scales for _ in range(6)]
    return model, calib


def _h(calib) -> np.ndarray:
    x = torch.cat(calib).double()
    return (x.T @ x / x.shape[0]).numpy()[None]


def _config(weight: QuantizerConfig, act_order: bool = False) -> Config:
    return Config(LayerConfig(None, weight), act_order=act_order)


def test_act_order_codes_are_core_round_matrix_with_act_order():
    model, calib = _linear_and_data()
    cfg = _config(QuantizerConfig(bits=4, granularity="channel"), act_order=True)
    q = lt.quantize(model, cfg, calib, rounding="gptq", progress=False)
    wq = q[0].weight_quantizer
    w = model[0].weight.detach().double().numpy()
    s = np.broadcast_to(wq.scale.double().numpy()[:, None], w.shape)
    ref = round_matrix(w[None], s[None], 0.0, -8, 7, _h(calib), act_order=True)[0]
    np.testing.assert_array_equal(wq.codes.numpy(), ref)
    plain = round_matrix(w[None], s[None], 0.0, -8, 7, _h(calib))[0]
    assert not np.array_equal(ref, plain)  # the order mattered
    assert q.lowbit_recipe["act_order"] is True


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_scales_are_fitted_as_gptq_goes_and_stored_with_the_codes(symmetric):
    model, calib = _linear_and_data(1)
    weight = QuantizerConfig(bits=4, granularity="group", group_size=8, symmetric=symmetric)
    q = lt.quantize(model, _config(weight), calib, rounding="gptq", progress=False)
    wq = q[0].weight_quantizer

    def fit(block):  # plain min/max of each row of the block, by hand
        lo, hi = np.minimum(block.min(-1, keepdims=True), 0), np.maximum(block.max(-1, keepdims=True), 0)
        if symmetric:
            amax = np.maximum(-lo, hi)
            return amax / 7, np.zeros_like(amax)
        scale = (hi - lo) / 15
        return scale, np.clip(np.rint(-8 - lo / scale), -8, 7)

    w = model[0].weight.detach().double().numpy()[None]
    codes, scale, zero = round_groups(w, 8, fit, -8, 7, _h(calib))
    np.testing.assert_array_equal(wq.codes.numpy(), codes[0])
    np.testing.assert_allclose(wq.scale.numpy(), scale[0], rtol=1e-6)
    np.testing.assert_array_equal(wq.zero_point.numpy(), zero[0])
    static = lt.quantize(model, _config(weight), calib, progress=False)[0].weight_quantizer.scale
    assert not torch.allclose(wq.scale, static)  # fitted to the updated weights, not the original ones
    with torch.no_grad():  # the layer runs the codes at the stored scales
        z = wq.zero_point.repeat_interleave(8, 1)
        torch.testing.assert_close(wq(q[0].weight), (wq.codes - z) * wq.scale.repeat_interleave(8, 1))


def test_act_order_with_groups_keeps_the_static_group_scales():
    model, calib = _linear_and_data(2)
    weight = QuantizerConfig(bits=4, granularity="group", group_size=8)
    q = lt.quantize(model, _config(weight, act_order=True), calib, rounding="gptq", progress=False)
    static = lt.quantize(model, _config(weight), calib, progress=False)[0].weight_quantizer
    torch.testing.assert_close(q[0].weight_quantizer.scale, static.scale, rtol=0, atol=0)
    w = model[0].weight.detach().double().numpy()
    s = static.scale.double().numpy().repeat(8, 1)
    ref = round_matrix(w[None], s[None], 0.0, -8, 7, _h(calib), act_order=True)[0]
    np.testing.assert_array_equal(q[0].weight_quantizer.codes.numpy(), ref)
