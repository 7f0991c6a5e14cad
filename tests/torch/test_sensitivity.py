"""Sensitivity analysis and automatic mixed precision of quantized PyTorch models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.analysis import Error, LayerReport, MixedResult, Step
from lowbit.analysis.report import render
from lowbit.core import QuantSpec
from lowbit.recipe import Config, LayerConfig, QuantizerConfig
from lowbit.torch.config import resolve
from lowbit.torch.sensitivity import by_noise_per_byte, search, weight_bytes
from lowbit.torch.switches import kept_float, only, quantized_layers, wider_weights
from tests.torch import models


def _spoiled(per_channel: bool = False):
    """The test convnet with one output channel of the first conv 50x larger, quantized with per-tensor weights:
    the first conv is the weak layer."""
    m = models.convnet()
    with torch.no_grad():
        m[0].weight[0] *= 50.0
        m[0].bias[0] *= 50.0
    gran = "channel" if per_channel else "tensor"
    cfg = Config(LayerConfig(input=QuantizerConfig(method="mse"), weight=QuantizerConfig(granularity=gran)))
    return m, lt.quantize(m, cfg, calib=models.batches(), progress=False)


def _modes(model):
    return {n: q.mode for n, q in lt.quantizers(model).items()}


def test_the_layer_that_alone_loses_most_ranks_first(tmp_path):
    _m, q = _spoiled()
    before = _modes(q)
    a = lt.analyze(q, models.batches(2, seed=5), progress=False, json_path=tmp_path / "a.json")
    assert _modes(q) == before  # the analysis leaves every quantizer as it found it
    assert sorted(r.name for r in a.layers) == ["0", "3", "8"]
    # measured independently: quantizing only the top-ranked layer costs more than only the last-ranked one
    errors = {}
    with torch.no_grad():
        for r in (a.layers[0], a.layers[-1]):
            err = 0.0
            for x in models.batches(2, seed=5):
                with only(q, []):
                    ref = q(x)
                with only(q, [r.name]):
                    err += float(((q(x) - ref) ** 2).sum())
            errors[r.name] = err
    assert errors[a.layers[0].name] > errors[a.layers[-1].name]
    assert a.layers[0].own_model.sqnr_db < a.layers[-1].own_model.sqnr_db
    assert a.weights[0].layer == "0" and a.weights[0].poor
    assert a.tensors and all(t.endswith(".input") for t in a.tensors)
    record = json.loads((tmp_path / "a.json").read_text())
    assert [r["name"] for r in record["layers"]] == [r.name for r in a.layers]


def test_float_reference_is_the_float_model():
    m, q = _spoiled()
    x = models.batches(1, seed=7)[0]
    with kept_float(q, list(quantized_layers(q))):
        torch.testing.assert_close(q(x), m(x), rtol=1e-5, atol=1e-5)  # BN folded: equal up to rounding
    assert not torch.allclose(q(x), m(x), atol=1e-4)


def test_search_keeps_layers_float_until_the_budget_holds():
    _m, q = _spoiled()
    batches = models.batches(2, seed=5)
    everything = search(q, ["0", "3", "8"], "cosine", max_drop=-1.0, batches=batches, progress=False)
    assert not everything.met and [s.kept for s in everything.steps] == [0, 1, 2, 3]
    assert everything.steps[-1].drop == pytest.approx(0.0, abs=1e-9)
    budget = everything.steps[1].drop + 1e-12
    if everything.steps[0].drop > budget:
        r = search(q, ["0", "3", "8"], "cosine", max_drop=budget, batches=batches, progress=False)
        assert r.met and r.kept == ["0"]
    lt.apply_mixed(q, everything)
    assert all(mode == "disabled" for mode in _modes(q).values())


def test_agreement_search_counts_its_samples():
    _m, q = _spoiled()
    batches = models.batches(2, seed=5)
    r = search(q, ["0"], "agreement", max_drop=100.0, batches=batches, progress=False)
    assert r.met and r.samples == sum(len(b) for b in batches) and r.noise is not None
    assert search(q, ["0"], "cosine", max_drop=1.0, batches=batches, progress=False).samples is None


def test_metric_function_and_its_reference():
    _m, q = _spoiled()
    calls = []

    def score(model):
        calls.append(_modes(model))
        return 1.0

    r = search(q, ["0"], score, max_drop=0.0, progress=False)
    assert r.met and r.reference == 1.0
    assert all(mode == "disabled" for mode in calls[0].values())  # the first score is FP32's


def test_bit_width_search_widens_weights_and_restores_them():
    m = models.convnet()
    q = lt.quantize(m, "w4a16_group128", calib=models.batches(), progress=False)
    layers = quantized_layers(q)
    scales = {n: lt.quantizers(layer)["weight_quantizer"].scale.clone() for n, layer in layers.items()}
    with wider_weights(q, ["0"]):
        assert layers["0"].weight_quantizer.spec.bits == 8
        assert torch.all(layers["0"].weight_quantizer.scale < scales["0"])
    assert layers["0"].weight_quantizer.spec.bits == 4
    for n, layer in layers.items():
        torch.testing.assert_close(layer.weight_quantizer.scale, scales[n], rtol=0, atol=0)
    a = lt.analyze(q, models.batches(2, seed=5), mode="bits", max_drop=-1.0, progress=False)
    assert a.mixed.steps[-1].kept == len(a.layers) and a.mixed.kind == "bits"
    assert "layer with 8-bit weights" in a.mixed.table()
    lt.apply_mixed(q, a.mixed)
    assert all(layer.weight_quantizer.spec.bits == 8 for layer in layers.values())


def _w4_config(input: QuantizerConfig | None = None) -> Config:
    """4-bit per-channel weights; ``input``: the inputs' config (None: float inputs)."""
    return Config(LayerConfig(input=input, weight=QuantizerConfig(bits=4, granularity="channel")))


def _w4():
    return lt.quantize(models.convnet(), _w4_config(), calib=models.batches(), progress=False)


def test_weight_bytes_follow_each_layers_width():
    q = _w4()  # conv 0: 216 weights, depthwise conv 3: 72, linear 8: 32
    assert weight_bytes(q) == (216 + 72 + 32) / 2
    with wider_weights(q, ["0"]):
        assert weight_bytes(q) == 216 + (72 + 32) / 2
    with kept_float(q, ["3"]):
        assert weight_bytes(q) == 72 * 4 + (216 + 32) / 2
    assert weight_bytes(q) == 160


def test_size_search_takes_the_most_noise_per_byte_first():
    q = _w4()
    layers = quantized_layers(q)

    def report(name, sqnr_db):
        return LayerReport(name, "", "", Error(0, 1, 0), Error(0, 1, 0), Error(sqnr_db, 1, 0))

    # Widening costs 108 bytes for conv 0, 16 for the linear layer: at equal noise the small layer comes first...
    assert by_noise_per_byte([report("0", 20), report("8", 20)], layers) == ["8", "0"]
    # ...unless the large one adds 10x its noise (0.01 / 108 bytes > 0.001 / 16 bytes).
    assert by_noise_per_byte([report("0", 20), report("8", 30)], layers) == ["0", "8"]
    with wider_weights(q, ["8"]):  # already 8-bit: nothing to widen
        assert by_noise_per_byte([report("0", 20), report("8", 20)], layers) == ["0"]

    a = lt.analyze(q, models.batches(2, seed=5), mode="bits", minimize="size", max_drop=-1.0, progress=False)
    sizes = [s.weight_bytes for s in a.mixed.steps]
    assert sizes[0] == 160 and sizes[-1] == 320 and sizes == sorted(sizes)
    assert "per weight byte" in a.mixed.order and "weights" in a.mixed.table()
    assert "(2.00x)" in a.mixed.size_note() and "2.00x" in render(a)
    with pytest.raises(ValueError, match="minimize='size' is for the bit-width search"):
        lt.analyze(q, models.batches(1), minimize="size", max_drop=1.0, progress=False)
    with pytest.raises(ValueError, match="minimize must be"):
        lt.analyze(q, models.batches(1), minimize="bytes", progress=False)


def test_a_search_outcome_becomes_a_config_for_a_fresh_quantization():
    cfg = _w4_config(QuantizerConfig(method="mse"))
    steps = [Step(0, None, 50.0, 50.0), Step(1, "0", 60.0, 40.0), Step(2, "8", 95.0, 5.0)]
    widened = lt.mixed_config(cfg, MixedResult("agreement", " %", 100.0, 10.0, steps, met=True, kind="bits"))
    for name in ("0", "8"):
        assert widened.for_layer(name).weight.bits == 8
        assert widened.for_layer(name).input == cfg.default.input  # the input's config unchanged
    assert widened.for_layer("3") == cfg.default
    q = lt.quantize(models.convnet(), widened, calib=models.batches(), rounding="gptq", progress=False)
    assert [q.get_submodule(n).weight_quantizer.spec.bits for n in ("0", "3", "8")] == [8, 4, 8]

    floated = lt.mixed_config("int8", MixedResult("cosine", "", 1.0, 0.1, steps[:2], met=True, kind="float"))
    assert floated.for_layer("0") is None and floated.for_layer("3") == resolve("int8").default
    assert lt.mixed_config("int8", MixedResult("cosine", "", 1.0, 0.1, steps[:1])) == resolve("int8")


def _narrow_layers(model) -> int:
    return sum(q.spec.bits == 4 and q.mode == "quantize" for q in lt.quantizers(model).values() if q.is_weight)


def test_a_re_rounding_search_doubles_then_bisects_and_keeps_the_final_model():
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(9)])
    calib = [torch.randn(16, 8) for _ in range(2)]
    q = lt.quantize(m, _w4_config(), calib=calib, progress=False)
    ranked = [f"{i}.0" for i in (3, 1, 4, 0, 5, 2, 6, 8, 7)]
    tried = []

    def score(model):  # minus the layers still at 4-bit weights: 5 must be widened for a drop <= 4
        tried.append(model)
        return -float(_narrow_layers(model))

    r = search(q, ranked, score, max_drop=4.0, mode="bits", rounding="gptq", calib=calib, progress=False)
    assert r.met and [s.kept for s in r.steps] == [0, 1, 2, 4, 5, 6, 8]  # 0, 1, 2, 4, 8 met, then 6, 5
    assert r.kept == ranked[:5] and r.final.kept == 5 and r.names == ranked
    assert all(t is not q for t in tried[1:]) and _narrow_layers(q) == 9  # copies tried; the model untouched
    assert r.model is not None and _narrow_layers(r.model) == 4
    assert [r.model.get_submodule(n).weight_quantizer.spec.bits for n in ranked] == [8] * 5 + [4] * 4
    assert "k-th layer" in r.table() and "re-rounded by gptq" in r.table()
    assert r.to_dict()["kept"] == ranked[:5] and "model" not in r.to_dict()
    miss = search(q, ranked, score, max_drop=-1.0, mode="bits", rounding="gptq", calib=calib, progress=False)
    assert not miss.met and miss.model is None and [s.kept for s in miss.steps] == [0, 1, 2, 4, 8, 9]
    assert miss.kept == ranked  # the most tried


def test_a_re_rounding_search_rounds_each_model_as_a_fresh_adaround_would():
    m = models.convnet()
    cfg = _w4_config(QuantizerConfig(method="mse"))
    q = lt.quantize(m, cfg, calib=models.batches(), progress=False)
    batches = models.batches(2, seed=5)

    def score(model):  # minus the layers still at 4-bit weights: two of three must be widened for a drop <= 1
        return -float(_narrow_layers(model))

    a = lt.analyze(q, batches, metric=score, mode="bits", max_drop=1.0, rounding="adaround", progress=False)
    r = a.mixed
    assert r.met and [s.kept for s in r.steps] == [0, 1, 2] and r.rounding == "adaround"
    assert len(r.kept) == 2 and r.kept == [x.name for x in a.layers][:2]
    # the final model has the codes AdaRound learns with those two layers widened: not the 4-bit model's codes
    expected = lt.apply_mixed(copy.deepcopy(q), r)
    lt.adaround(expected, batches, progress=False)
    rounded = {n: r.model.get_submodule(n).weight_quantizer.codes for n in ("0", "3", "8")}
    for name, codes in rounded.items():
        assert torch.equal(codes, expected.get_submodule(name).weight_quantizer.codes)
    plain = lt.apply_mixed(copy.deepcopy(q), r)
    assert any(not torch.equal(c, plain.get_submodule(n).weight_quantizer.codes) for n, c in rounded.items())
    html = render(a)
    assert "bisection" in html and "re-rounded by adaround" in html
    with pytest.raises(ValueError, match="rounding must be one of"):
        lt.analyze(q, batches, max_drop=1.0, rounding="nearest", progress=False)
    with pytest.raises(Exception, match="needs calibration batches"):
        search(q, ["0"], "cosine", max_drop=1.0, batches=batches, rounding="adaround", progress=False)


def test_report_of_a_torch_analysis():
    _, q = _spoiled()
    a = lt.analyze(q, models.batches(2, seed=5), max_drop=1.0, progress=False)
    html = render(a)
    assert "Automatic mixed precision" in html and "<img " in html
    assert a.mixed.met and a.mixed.kept == []


def test_bad_input():
    with pytest.raises(Exception, match="no quantized layer"):
        lt.analyze(nn.Sequential(nn.Linear(2, 2)), [torch.zeros(1, 2)], progress=False)
    _, q = _spoiled()
    with pytest.raises(Exception, match="empty"):
        lt.analyze(q, [], progress=False)
    with pytest.raises(ValueError, match="mode"):
        lt.analyze(q, models.batches(1), mode="nope", progress=False)
    assert QuantSpec()  # keeps the import honest
