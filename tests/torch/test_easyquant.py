"""EasyQuant (lowbit.torch.easyquant): each layer's output cosine to FP32 never drops, the scales move within
[0.5, 2] of the calibrated ones, the model's output error does not grow (and shrinks where max ranges are poor),
for per-channel and per-tensor weights, symmetric and asymmetric inputs, and weight-only layers."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.errors import CalibrationError
from lowbit.recipe import Config, LayerConfig, QuantizerConfig
from lowbit.torch.easyquant import grid, refinable
from tests.torch.models import MLP, batches, convnet


def _refined(config) -> Config:
    return replace(lt.preset(config) if isinstance(config, str) else config, refine="easyquant")


def _outputs(model: nn.Module, data: list[torch.Tensor], quantized: bool) -> dict[str, torch.Tensor]:
    """Every refinable layer's output over ``data``, in the quantized model as it runs, or with every quantizer
    off (FP32)."""
    layers = {n: m for n, m in model.named_modules() if refinable(m)}
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [m.register_forward_hook(lambda m, a, y, n=n: out[n].append(y.flatten())) for n, m in layers.items()]
    saved = {q: q.mode for q in lt.quantizers(model).values()}
    try:
        if not quantized:
            for q in saved:
                q.mode = "disabled"
        with torch.no_grad():
            for x in data:
                model(x)
    finally:
        for q, mode in saved.items():
            q.mode = mode
        for h in hooks:
            h.remove()
    return {n: torch.cat(v).double() for n, v in out.items()}


def _cosines(model: nn.Module, data: list[torch.Tensor]) -> dict[str, float]:
    """Each layer's output cosine to FP32: the quantized model's own output there against the float model's."""
    q, f = _outputs(model, data, True), _outputs(model, data, False)
    return {n: float(torch.nn.functional.cosine_similarity(q[n], f[n], dim=0)) for n in q}


def _scales(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: q.scale.detach().clone() for n, q in lt.quantizers(model).items() if q.mode == "quantize"}


def _mse(model: nn.Module, reference: nn.Module, data: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float((model(x) - reference(x)).pow(2).mean()) for x in data) / len(data)


def test_grid_is_geometric_within_half_and_double_with_one():
    f = grid(9)
    assert f[0] == 0.5 and f[-1] == 2.0 and (f == 1).sum() == 1 and len(f) == 9
    assert torch.allclose(f[1:] / f[:-1], (f[1] / f[0]).expand(8))
    assert len(grid(4)) == 5  # an even count gets 1 added


W4A8_PER_TENSOR = lt.preset("w4a8").with_weight_granularity("tensor")
CONFIGS = {
    "w4a8": "w4a8",  # per-channel int4 weights, symmetric int8 input
    "w8a8_asym": "w8a8_asym",  # asymmetric uint8 input
    "w4a8 per tensor": W4A8_PER_TENSOR,
    "w4a16_group128": "w4a16_group128",  # weight only: no input step
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_layer_cosine_is_at_least_the_start_and_scales_stay_in_range(config):
    model, data = convnet(), batches(n=2, batch=4, shape=(3, 8, 8))
    start = lt.quantize(model, config, calib=data, progress=False)
    refined = copy.deepcopy(start)
    report = lt.easyquant(refined, data, points=17, progress=False)
    assert list(report) == ["0", "3", "8"]
    after = _cosines(refined, data)
    for name, (before_cos, after_cos) in report.items():
        assert after_cos >= before_cos
        assert after[name] == pytest.approx(after_cos, abs=1e-6)  # what it reports is what the model does
        # The layer with its starting scales, every layer before it refined: what it started from.
        mixed = copy.deepcopy(refined)
        for prefix in (f"{name}.input_quantizer", f"{name}.weight_quantizer"):
            q = dict(mixed.named_modules())[prefix]
            q.scale.data = dict(start.named_modules())[prefix].scale.detach().clone()
        assert _cosines(mixed, data)[name] == pytest.approx(before_cos, abs=1e-6)
        assert after[name] >= _cosines(mixed, data)[name] - 1e-6
    old, new = _scales(start), _scales(refined)
    ratios = torch.cat([(new[n] / old[n]).flatten() for n in old])
    assert bool(((ratios >= 0.5 - 1e-6) & (ratios <= 2 + 1e-6)).all())
    assert bool((ratios != 1).any())  # something moved
    if config == "w4a16_group128":
        assert all(not n.endswith(".input") for n in new)  # weight only: no input quantizer to search


def test_model_error_does_not_grow_at_w4a8():
    model, data = convnet(), batches(n=2, batch=4, shape=(3, 8, 8))
    plain = lt.quantize(model, "w4a8", calib=data, progress=False)
    refined = lt.quantize(model, _refined("w4a8"), calib=data, progress=False)
    assert _mse(refined, model, data) <= _mse(plain, model, data)


def _outlier_mlp() -> nn.Module:
    """An MLP whose weights each carry a few large outliers: max ranges waste most of a 4-bit grid on them."""
    model = MLP(seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for fc in (model.fc1, model.fc2):
            w = fc.weight.view(-1)
            w[torch.randperm(w.numel(), generator=g)[:2]] *= 12
    return model


def test_poor_max_scales_get_better():
    model = _outlier_mlp()
    data = batches(n=4, batch=32, shape=(16,))
    minmax = QuantizerConfig(bits=8, method="minmax")
    config = Config(LayerConfig(input=minmax, weight=QuantizerConfig(bits=4, granularity="tensor", method="minmax")))
    plain = lt.quantize(model, config, calib=data, progress=False)
    refined = lt.quantize(model, replace(config, refine="easyquant"), calib=data, progress=False)
    before, after = _mse(plain, model, data), _mse(refined, model, data)
    assert after < 0.7 * before, (before, after)
    test = batches(n=2, batch=32, shape=(16,), seed=7)  # and on data it did not see
    assert _mse(refined, model, test) < _mse(plain, model, test)


def test_quantize_records_refine_and_rounding_follows_at_the_chosen_scales():
    model, data = MLP(), batches(n=2, batch=16, shape=(16,))
    q = lt.quantize(model, _refined("w4a8"), calib=iter(data), rounding="gptq", progress=False)
    assert q.lowbit_recipe["refine"] == "easyquant" and q.lowbit_recipe["rounding"] == "gptq"
    plain = lt.quantize(model, "w4a8", calib=data, progress=False)
    assert lt.quantize(model, "w4a8", calib=data, progress=False).lowbit_recipe["refine"] is None
    assert any(not torch.equal(a, b) for a, b in zip(_scales(q).values(), _scales(plain).values(), strict=True))


def test_refine_needs_calibration_batches():
    model, data = MLP(), batches(n=2, batch=4, shape=(16,))
    with pytest.raises(CalibrationError, match=r"^refine='easyquant' needs calibration data \(calib=\)"):
        lt.quantize(model, _refined("int8_dynamic"))
    with pytest.raises(CalibrationError, match=r"^refine='easyquant' needs calibration batches .* not a forward loop"):
        lt.quantize(model, _refined("int8"), calib=lambda m: [m(x) for x in data])
    q = lt.quantize(model, "int8", calib=data, progress=False)
    with pytest.raises(CalibrationError, match="needs calibration batches; calib is empty"):
        lt.easyquant(q, [])
    with pytest.raises(CalibrationError, match=r"cannot refine nope: .* Refinable layers: fc1, fc2"):
        lt.easyquant(q, data, names=["nope"])
    with pytest.raises(CalibrationError, match="0 < low <= 1 <= high"):
        lt.easyquant(q, data, low=1.5)


def test_weights_only_on_a_dynamic_input_and_a_streamed_layer_give_the_same_choice():
    model, data = MLP(), batches(n=3, batch=8, shape=(16,))
    q = lt.quantize(model, _refined("int8_dynamic"), calib=data, progress=False)
    assert q.lowbit_recipe["refine"] == "easyquant"
    a = lt.quantize(model, "w4a8", calib=data, progress=False)
    b = copy.deepcopy(a)
    ra = lt.easyquant(a, data, points=9, progress=False)
    rb = lt.easyquant(b, data, points=9, cache_mb=0, progress=False)  # nothing kept: recomputed every step
    assert ra.keys() == rb.keys() and all(ra[n] == pytest.approx(rb[n]) for n in ra)
    assert all(torch.equal(x, y) for x, y in zip(_scales(a).values(), _scales(b).values(), strict=True))
