"""Where the number formats meet the rest of lowbit.torch: followed ranges, state dicts, widening for mixed
precision, weight roundings, end layers, sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.core import QuantSpec, mse_range_per_slice
from lowbit.errors import CalibrationError, SpecError
from lowbit.recipe import Config, LayerConfig, QuantizerConfig
from lowbit.torch import TensorQuantizer
from lowbit.torch.layers import QuantMixin
from lowbit.torch.rounding.roundable import roundable
from lowbit.torch.switches import wider_weights

ACT = QuantizerConfig(signed=None, symmetric=None, method=None)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


def _quantized(weight: QuantizerConfig, **kw) -> nn.Module:
    return lt.quantize(_model(), Config(LayerConfig(ACT, weight)), calib=_batches(), progress=False, **kw)


def test_a_log2_weight_range_is_its_scale_and_following_the_weight_keeps_it():
    q = _quantized(QuantizerConfig(bits=4, format="log2", granularity="channel"))
    wq = q[0].weight_quantizer
    scale = wq.scale.detach().clone()
    torch.testing.assert_close(wq.real_range()[1], scale)  # the largest code is worth the scale, not 7 times it
    wq.follow_weight = True
    q.train()
    q(_batches()[0])
    torch.testing.assert_close(wq.scale.detach(), scale)


def test_a_learned_exponent_loads_from_and_into_a_plain_quantizer():
    spec = QuantSpec(bits=4, scale_kind="pow2")
    learned, plain = TensorQuantizer(spec, learn_scale=True), TensorQuantizer(spec)
    learned.set_range(-3.0, 3.0)
    plain.load_state_dict(learned.state_dict())  # QAT checkpoint into a fixed-scale model
    assert plain.scale.item() == learned.scale.item() == 0.5
    again = TensorQuantizer(spec, learn_scale=True)
    again.load_state_dict(plain.state_dict())  # a PTQ checkpoint starts QAT: the exponent comes from the scale
    assert again.log2_scale.item() == -1.0 and again.scale.item() == 0.5


@pytest.mark.parametrize(
    "weight",
    [
        QuantizerConfig(bits=4, format="log2", granularity="channel"),
        QuantizerConfig(bits=2, format="ternary", granularity="channel"),
        QuantizerConfig(format="fp8_e4m3", granularity="channel"),
    ],
    ids=["log2", "ternary", "fp8"],
)
def test_a_widened_layer_has_int8_weights_whatever_its_format(weight):
    q, int8 = _quantized(weight), _quantized(QuantizerConfig(bits=8, granularity="channel"))
    with torch.no_grad():
        expected = int8[0].weight_quantizer(int8[0].weight)
        with wider_weights(q, ["0"]):
            spec = q[0].weight_quantizer.spec
            assert (spec.format, spec.bits) == ("int", 8)
            torch.testing.assert_close(q[0].weight_quantizer(q[0].weight), expected)
        assert q[0].weight_quantizer.spec.format == weight.format
        assert not torch.equal(q[0].weight_quantizer(q[0].weight), expected)


def test_weight_roundings_refuse_binary_weights_and_do_not_count_them_roundable():
    binary = QuantizerConfig(bits=1, granularity="channel")
    with pytest.raises(SpecError, match="binary weights round to nearest only"):
        _quantized(binary, rounding="gptq")
    q = _quantized(binary)
    assert not any(roundable(m) for m in q.modules())
    with pytest.raises(CalibrationError, match="format binary rounds to nearest"):
        q[0].weight_quantizer.set_codes(torch.zeros_like(q[0].weight, dtype=torch.int32))


def test_binary_and_ternary_refuse_pow2_and_groups():
    with pytest.raises(SpecError, match="scale_kind='float'"):
        QuantizerConfig(bits=1, scale="pow2")
    with pytest.raises(SpecError, match="scale_kind='float'"):
        QuantizerConfig(bits=2, format="ternary", scale="pow2")
    with pytest.raises(SpecError, match="not per group"):
        _quantized(QuantizerConfig(bits=2, format="ternary", granularity="group", group_size=4))


def test_the_mse_weight_range_does_not_depend_on_stochastic_rounding():
    w = np.random.default_rng(0).laplace(size=(4, 256)).astype(np.float32)
    spec = QuantSpec(bits=4, axis=0, rounding="stochastic")
    first, second = mse_range_per_slice(w, spec), mse_range_per_slice(w, spec)
    nearest = mse_range_per_slice(w, spec.replace(rounding="nearest"))
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[1], nearest[1])


def test_the_end_layers_keep_learned_scales_and_pow2():
    config = lt.preset("w2a8").with_scale("pow2").with_learned_scales()
    q = lt.quantize(_model(), config, calib=_batches(), qat=True, progress=False)
    layers = [m for m in q.modules() if isinstance(m, QuantMixin)]
    first = layers[0].weight_quantizer
    assert first.spec.bits == 8 and first.spec.scale_kind == "pow2" and first.learns_exponent
    sizes = lt.packed_weight_bytes(q)
    assert sizes["float"] == 4 * sum(m.bias.numel() for m in layers)  # learned exponents are not float weights
