"""SmoothQuant in lowbit.torch.quantize (Config.smoothquant; lowbit.torch.smoothing.smoothquant)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import lowbit.torch as lt
from lowbit.core.smoothing import smooth_scales
from lowbit.errors import CalibrationError
from lowbit.recipe import preset
from lowbit.torch.smoothing import SmoothedLinear
from tests.torch.transformer_models import TinyGPT, tokens


def _error(q, model, test) -> float:
    with torch.no_grad():
        return float(sum(((q(x) - model(x)) ** 2).mean() for x in test) / len(test))


@pytest.mark.parametrize("alpha", [0.5, "search"])
def test_smoothquant_lowers_the_w8a8_error_on_outlier_activations(alpha):
    model, calib, test = TinyGPT().eval(), tokens(4), tokens(2, seed=5)
    cfg = preset("int8").with_method("minmax")  # the search calibrates each candidate's input: minmax is quick
    plain = _error(lt.quantize(model, cfg, calib, progress=False), model, test)
    smoothed = lt.quantize(model, replace(cfg, smoothquant=alpha), calib, progress=False)
    assert _error(smoothed, model, test) < 0.5 * plain
    assert smoothed.lowbit_recipe["smoothquant"] == alpha


def test_smoothing_scales_are_smooth_scales_of_the_input_and_weight_maxima():
    """The scale folded into block 0's first LayerNorm is smooth_scales(max|x| per column over the calibration
    data, max|w| per column over q, k and v), gathered here independently."""
    model, calib = TinyGPT().eval(), tokens(3)
    seen = []
    hook = model.blocks[0].q.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 32).abs().amax(0)))
    with torch.no_grad():
        for x in calib:
            model(x)
    hook.remove()
    act = torch.stack(seen).amax(0).double().numpy()
    b = model.blocks[0]
    wmax = torch.stack([m.weight.abs().amax(0) for m in (b.q, b.k, b.v)]).amax(0).double().detach().numpy()
    s = smooth_scales(act, wmax, 0.5)
    q = lt.quantize(model, replace(preset("int8"), smoothquant=0.5), calib, progress=False)
    np.testing.assert_allclose((b.ln1.weight / q.blocks[0].ln1.weight).detach().numpy(), s, rtol=1e-5)
    torch.testing.assert_close(q.blocks[0].k.weight, b.k.weight * torch.from_numpy(s), rtol=1e-5, atol=1e-7)
    assert isinstance(q.blocks[0].o, SmoothedLinear)  # no producer to fold into: a Mul before it


def test_smoothquant_needs_data_and_static_inputs():
    with pytest.raises(CalibrationError, match="smoothquant needs calibration data"):
        lt.quantize(TinyGPT(), replace(preset("int8_dynamic"), smoothquant=0.5), progress=False)
