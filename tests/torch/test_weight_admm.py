"""Weight ranges fitted by ADMM in the PyTorch front end: per channel and per tensor, from a max or percentile
start, and lower 4-bit weight error than min/max."""

from __future__ import annotations

import pytest
import torch

import lowbit.torch as lt
from lowbit.core import QuantSpec
from lowbit.errors import CalibrationError
from lowbit.torch import TensorQuantizer
from tests.torch import models


def _weight_quantizer(spec: QuantSpec, method: str, options: dict | None = None) -> TensorQuantizer:
    q = TensorQuantizer(spec, method=method, method_options=options)
    q.is_weight = True
    return q


@pytest.mark.parametrize("axis", [0, None], ids=["channel", "tensor"])
def test_admm_weight_scales_move_and_lower_the_4bit_error(axis):
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    errors, scales = {}, {}
    for method in ("minmax", "admm"):
        q = _weight_quantizer(QuantSpec(bits=4, axis=axis), method)
        q.calibrate_on(w)
        assert q.mode == "quantize" and q.scale.shape == ((8,) if axis == 0 else ())
        errors[method], scales[method] = float(((q(w) - w) ** 2).sum()), q.scale.clone()
    assert torch.all(scales["admm"] < scales["minmax"])  # Gaussian tails clipped
    assert errors["admm"] < 0.8 * errors["minmax"]


def test_a_percentile_start_reaches_the_weight_and_bad_options_are_named():
    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    w[:, 0] = 20.0  # one huge weight a row: a max start sits far from the bulk
    spec = QuantSpec(bits=4, axis=0)
    fits = {}
    for start in ("max", "percentile"):
        q = _weight_quantizer(spec, "admm", {"start": start, "percentile": 99.0})
        q.calibrate_on(w)
        fits[start] = q.scale.clone()
    assert not torch.equal(fits["max"], fits["percentile"])
    with pytest.raises(CalibrationError, match=r"quantizer 'fc\.weight': start must be one of max, percentile"):
        q = TensorQuantizer(spec, method="admm", method_options={"start": "mean"}, name="fc.weight")
        q.calibrate_on(w)


def test_a_recipe_with_admm_weights_quantizes_a_model():
    model, data = models.convnet(), models.batches()
    results = {}
    for method in ("minmax", "admm"):
        weight = lt.QuantizerConfig(bits=4, granularity="channel", method=method)
        config = lt.Config(lt.LayerConfig(lt.QuantizerConfig(), weight))
        q = lt.quantize(model, config, calib=data, progress=False)
        layers = [m for m in q.modules() if hasattr(m, "weight_quantizer")]
        with torch.no_grad():
            results[method] = sum(float(((m.weight_quantizer(m.weight) - m.weight) ** 2).sum()) for m in layers)
    assert results["admm"] < results["minmax"]
