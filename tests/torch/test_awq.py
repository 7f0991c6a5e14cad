"""AWQ in the PyTorch front end (lowbit.torch.rounding.awq) and the smoothing machinery under it
(lowbit.torch.smoothing): groups by tensor identity, folding, the search against lowbit.core.smoothing, export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.core.smoothing import search_scales
from lowbit.recipe import Config, LayerConfig, QuantizerConfig
from lowbit.torch.blockwise import whole_model
from lowbit.torch.rounding.capture import all_float
from lowbit.torch.smoothing import SmoothedLinear, apply_scales, input_groups, smoothable, weight_fake_quant
from tests.torch.transformer_models import TinyGPT, tokens


def w4(group: int = 16) -> Config:
    return Config(LayerConfig(None, QuantizerConfig(bits=4, granularity="group", group_size=group)))


def scalable(q: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in q.named_modules() if smoothable(m)}


def groups_of(q: nn.Module, batch: torch.Tensor):
    return input_groups(q, scalable(q), whole_model(q, [batch], "test", False).run_first)


def test_groups_are_the_layers_reading_one_tensor_with_the_foldable_producer():
    q = lt.quantize(TinyGPT(), w4(), tokens(1), progress=False)
    found = {tuple(g.names): g.producer for g in groups_of(q, tokens(1)[0])}
    assert found == {
        ("embed",): None,  # the model's input: nothing to fold into
        ("blocks.0.q", "blocks.0.k", "blocks.0.v"): q.blocks[0].ln1,
        ("blocks.0.o",): None,  # attention's output, reshaped
        ("blocks.0.fc1",): q.blocks[0].ln2,
        ("blocks.0.fc2",): None,  # after a GELU
        ("blocks.1.q", "blocks.1.k", "blocks.1.v"): q.blocks[1].ln1,
        ("blocks.1.o",): None,
        ("blocks.1.fc1",): q.blocks[1].ln2,
        ("blocks.1.fc2",): None,
        ("head",): q.ln_f,
    }


class ReadTwice(nn.Module):
    """A LayerNorm read by a Linear and by an Add, and a Linear read straight by another Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ln, self.a, self.b, self.c = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.ln(x)
        return self.c(self.b(self.a(h) + h))


def test_a_tensor_read_by_anything_else_is_not_folded_into_its_producer():
    q = lt.quantize(ReadTwice(), w4(8), [torch.randn(4, 8)], progress=False)
    found = {tuple(g.names): g.producer for g in groups_of(q, torch.randn(4, 8))}
    assert found == {("a",): None, ("b",): None, ("c",): q.b}


@pytest.mark.parametrize("model", [TinyGPT, ReadTwice])
def test_applying_any_scales_keeps_the_float_model_and_refits_the_weight_scales(model):
    net = model().eval()
    batch = tokens(1)[0] if model is TinyGPT else torch.randn(4, 8)
    q = lt.quantize(net, w4(8), [batch], progress=False)
    g = torch.Generator().manual_seed(3)
    for group in groups_of(q, batch):
        s = (torch.rand(group.layers[0].in_features, generator=g) * 4 + 0.25).numpy()
        apply_scales(q, group, s)
    with torch.no_grad(), all_float(q):
        torch.testing.assert_close(q(batch), net(batch), rtol=1e-4, atol=1e-4)
    for m in scalable(q).values():  # max |w| per group is the grid's end again
        w, wq = m.weight_quantizer, m.weight.detach()
        amax = wq.reshape(wq.shape[0], -1, 8).abs().amax(-1)
        torch.testing.assert_close(w.scale * 7, amax, rtol=1e-5, atol=1e-7)
    kinds = {n: type(m).__name__ for n, m in q.named_modules() if isinstance(m, nn.Linear)}
    explicit = {n for n, k in kinds.items() if k == "SmoothedLinear"}
    assert explicit == ({"embed", "blocks.0.o", "blocks.0.fc2", "blocks.1.o", "blocks.1.fc2"} if model is TinyGPT
                        else {"a", "b"})  # fmt: skip


@pytest.mark.parametrize("group", [16, 32])
def test_awq_lowers_the_int4_output_error_against_plain_rounding(group):
    """The layers that read the LayerNorms' outlier channels quantized (the others, whose inputs have no
    outliers, gain little and would only dilute the comparison), on data AWQ did not see."""
    model = TinyGPT(d=64).eval()
    calib, test = tokens(8), tokens(4, seed=5)
    cfg = w4(group).override("embed", None).override("*.o", None).override("*.fc2", None)
    with torch.no_grad():
        ref = torch.cat([model(x) for x in test])
    errors = {}
    for rounding in ("nearest", "awq"):
        q = lt.quantize(model, cfg, calib, rounding=rounding, progress=False)
        with torch.no_grad():
            errors[rounding] = float(((torch.cat([q(x) for x in test]) - ref) ** 2).mean())
    assert errors["awq"] < 0.5 * errors["nearest"]


def test_awq_scales_are_core_search_on_the_layer_input_and_own_quantizer():
    """One group (q, k, v of block 0), every input row in the sample: the scales folded into the LayerNorm are
    search_scales' on the inputs gathered here by a plain hook, with the layers' own weight quantization."""
    model, calib = TinyGPT().eval(), tokens(2, batch=2, t=8)
    base = lt.quantize(model, w4(), calib, progress=False)
    rows = []
    hook = base.blocks[0].q.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, 32).double()))
    with torch.no_grad(), all_float(base):
        for x in calib:
            base(x)
    hook.remove()
    x = torch.cat(rows).numpy()
    layers = [base.blocks[0].q, base.blocks[0].k, base.blocks[0].v]
    ws = [m.weight.detach().double().numpy() for m in layers]
    quantizers = [weight_fake_quant(m.weight_quantizer) for m in layers]
    calls = iter(range(10**6))
    ref = search_scales(ws, x, lambda w: quantizers[next(calls) % 3](w), np.abs(x).mean(0))
    q = lt.quantize(model, w4(), calib, progress=False)
    lt.awq(q, calib, names=["blocks.0.q", "blocks.0.k", "blocks.0.v"], rows=10**4, progress=False)
    s = base.blocks[0].ln1.weight.detach() / q.blocks[0].ln1.weight.detach()
    np.testing.assert_allclose(s.numpy(), ref.scales, rtol=1e-5)
    torch.testing.assert_close(q.blocks[0].q.weight, base.blocks[0].q.weight * s, rtol=1e-5, atol=1e-7)
    assert not isinstance(q.blocks[0].q, SmoothedLinear)


def test_awq_and_smoothquant_models_export_and_run_in_onnx_runtime_as_in_torch(tmp_path):
    """W4A8 with SmoothQuant and AWQ: LayerNorms folded twice, explicit Muls before o, fc2 and embed."""
    cfg = Config(
        LayerConfig(QuantizerConfig(), QuantizerConfig(bits=4, granularity="group", group_size=8)), smoothquant=0.5
    )
    q = lt.quantize(TinyGPT(d=16), cfg, tokens(2, t=8), rounding="awq", progress=False)
    assert isinstance(q.blocks[0].o, SmoothedLinear)
    x = tokens(1, t=8, seed=9)[0]
    path = lt.export_onnx(q, x, tmp_path / "awq.onnx", opset=21)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, q(x).numpy(), rtol=1e-4, atol=1e-4)


def test_awq_with_static_inputs_calibrates_the_scaled_inputs_again():
    cfg = Config(LayerConfig(QuantizerConfig(), QuantizerConfig(bits=4, granularity="group", group_size=16)))
    calib = tokens(4)
    q = lt.quantize(TinyGPT(), cfg, calib, rounding="awq", progress=False)
    seen = []
    hook = q.blocks[0].o.register_forward_pre_hook(lambda m, a: seen.append((a[0] * m.input_scale).abs().max()))
    inputs = [m for m in lt.quantizers(q).values() if not m.is_weight]
    for m in inputs:  # as in calibration: weights quantized, activations in float
        m.mode = "disabled"
    with torch.no_grad():
        for x in calib:
            q(x)
    hook.remove()
    amax = float(q.blocks[0].o.input_quantizer.scale) * 127
    assert amax == pytest.approx(float(max(seen)), rel=1e-5)  # minmax on x * input_scale, not on x


def test_awq_plus_gptq_lowers_the_error_further_and_records_the_rounding():
    model = TinyGPT(d=64).eval()
    calib, test = tokens(8), tokens(4, seed=5)
    with torch.no_grad():
        ref = torch.cat([model(x) for x in test])
    errors = {}
    for rounding in ("awq", "awq+gptq"):
        q = lt.quantize(model, w4(), calib, rounding=rounding, progress=False)
        with torch.no_grad():
            errors[rounding] = float(((torch.cat([q(x) for x in test]) - ref) ** 2).mean())
    assert errors["awq+gptq"] < errors["awq"]
    assert q.lowbit_recipe["rounding"] == "awq+gptq"
    assert any(m.weight_quantizer.has_codes for m in scalable(q).values())
