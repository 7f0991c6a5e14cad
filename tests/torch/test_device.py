"""lowbit.torch on a GPU: calibration, PTQ, QAT, the rounding searches and export with the model and its data on
CUDA compute what they compute on the CPU.

Skipped where no CUDA device is present (CI has none). ``LOWBIT_TEST_DEVICE=cpu`` runs them with the CPU as the
"device", to check the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.torch.layers import QuantLSTM
from tests.torch import models

DEVICE = os.environ.get("LOWBIT_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA device (LOWBIT_TEST_DEVICE=cpu runs these on the CPU)", allow_module_level=True)


@pytest.fixture(autouse=True)
def _exact_float32():
    """Plain float32 on the GPU (no TF32 matrix products), so that it computes what the CPU computes up to the
    order of the sums, and the two can be compared tightly."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _to(batches, device=DEVICE):
    return [b.to(device) for b in batches]


def _on_device(model: nn.Module) -> None:
    """Every parameter and buffer of ``model`` (the quantizers' scales and codes included) is on DEVICE."""
    wrong = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != DEVICE]
    assert not wrong, f"not on {DEVICE}: {wrong}"


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The same scales and codes give the same outputs, up to a few values that the GPU's float sums (in another
    order) land on the other side of a rounding boundary: one step of a code, a few % of the output's range."""
    got = got.cpu()
    torch.testing.assert_close(got, expected, atol=0.03 * float(expected.abs().max()), rtol=0)
    assert float((got - expected).abs().mean()) <= 0.01 * float(expected.abs().mean())


def _assert_same_quantizers(cpu: nn.Module, dev: nn.Module) -> None:
    a, b = lt.quantizers(cpu), lt.quantizers(dev)
    assert list(a) == list(b)
    for name in a:
        assert a[name].mode == b[name].mode, name
        if a[name].calibrated:
            torch.testing.assert_close(b[name].scale.detach().cpu(), a[name].scale.detach(), rtol=1e-4, atol=0)
            torch.testing.assert_close(b[name].zero_point.cpu(), a[name].zero_point, rtol=0, atol=0)


@pytest.mark.parametrize("config", ["int8", "w8a8_asym", "w4a8", "w4a4", "w4a16_group128", "int8_dynamic"])
def test_ptq_with_the_model_and_data_on_the_device_matches_the_cpu(config):
    model, calib, x = models.convnet(), models.batches(), models.batches(1, seed=9)[0]
    cpu = lt.quantize(model, config, calib=calib, progress=False)
    dev = lt.quantize(copy.deepcopy(model).to(DEVICE), config, calib=_to(calib), progress=False)
    _on_device(dev)
    _assert_same_quantizers(cpu, dev)
    with torch.no_grad():
        expected, got = cpu(x), dev(x.to(DEVICE))
    assert got.device.type == DEVICE
    _close(got, expected)


def test_a_forward_loop_and_residual_adds_calibrate_on_the_device():
    model, calib = models.ResBlock().eval(), [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i))
                                               for i in range(3)]  # fmt: skip
    cfg = lt.preset("int8").with_residual_adds()

    def loop(m):
        for b in calib:
            m(b.to(next(m.parameters()).device))

    cpu = lt.quantize(model, cfg, calib=loop, progress=False)
    dev = lt.quantize(copy.deepcopy(model).to(DEVICE), cfg, calib=loop, progress=False)
    _on_device(dev)
    assert any(isinstance(m, lt.QuantAdd) for m in dev.modules())
    _assert_same_quantizers(cpu, dev)
    x = calib[0]
    with torch.no_grad():
        torch.testing.assert_close(dev(x.to(DEVICE)).cpu(), cpu(x), atol=0.05, rtol=0.02)


def test_a_model_quantized_on_the_cpu_runs_on_the_device_after_to():
    q = lt.quantize(models.convnet(), "w4a8", calib=models.batches(), progress=False)
    x = models.batches(1, seed=9)[0]
    with torch.no_grad():
        expected = q(x)
        moved = copy.deepcopy(q).to(DEVICE)
        _on_device(moved)
        got = moved(x.to(DEVICE)).cpu()
    _close(got, expected)


def _qat_model(model, calib):
    w4 = lt.Config(lt.LayerConfig(lt.QuantizerConfig(bits=4, method="mse", learn_scale=True),
                                  lt.QuantizerConfig(bits=4, granularity="channel", learn_scale=True)))  # fmt: skip
    return lt.quantize(model, w4, calib=calib, qat=True, progress=False)


def test_one_qat_step_gives_the_cpu_gradients_on_the_device():
    """Straight-through estimator, learned scales (LSQ) and BatchNorm in training: the same gradients."""
    model, calib = models.convnet(), models.batches(2, batch=16)
    cpu = _qat_model(model, calib)
    dev = copy.deepcopy(cpu).to(DEVICE)
    x, t = models.batches(1, batch=16, seed=7)[0], torch.arange(16) % 4
    for m, device in ((cpu, "cpu"), (dev, DEVICE)):
        m.train()
        nn.functional.cross_entropy(m(x.to(device)), t.to(device)).backward()
    grads = dict(cpu.named_parameters())
    checked = 0
    for name, p in dev.named_parameters():
        ref = grads[name].grad
        assert p.grad is not None and p.grad.device.type == DEVICE, name
        # A GPU sum in another order can put a value on the other side of a rounding or clipping boundary: the
        # gradients agree on all but a few elements. (A bias before a BatchNorm in training gets 0 up to float
        # error: the batch mean takes it away.)
        close = torch.isclose(p.grad.cpu(), ref, rtol=1e-3, atol=1e-5 * float(ref.abs().max()) + 1e-6)
        assert float(close.float().mean()) >= 0.97, name
        checked += name.endswith("scale")
    assert checked == 6  # the input and weight scales of the three layers are learned


def test_qat_trains_on_the_device_then_exports_what_it_computes(tmp_path):
    torch.manual_seed(0)
    model, data = models.convnet(), _to(models.batches(8, batch=16))
    target = [model.to(DEVICE)(x).argmax(1) for x in data]
    q = _qat_model(model, data[:2])
    for tq in lt.quantizers(q).values():
        if not tq.is_weight:
            tq.observe_steps = 5  # the activation ranges follow the data for 5 steps, then freeze
    _on_device(q)
    scales = [p for n, p in q.named_parameters() if n.endswith("scale")]
    rest = [p for n, p in q.named_parameters() if not n.endswith("scale")]
    opt = torch.optim.Adam([{"params": rest}, {"params": scales, "lr": 1e-3}], lr=1e-2)  # 4-bit weight steps: ~0.03
    start, end = models.fit(q, data, target, opt, epochs=10)
    assert end < 0.5 * start
    assert all(tq.observe_steps == 0 for tq in lt.quantizers(q).values())
    _on_device(q)
    x = models.batches(1, seed=11)[0].to(DEVICE)
    path = lt.export_onnx(q, x, tmp_path / "qat.onnx")
    _on_device(q)  # exporting leaves the model where it was
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.cpu().numpy()})[0]
    with torch.no_grad():
        ref = q(x).cpu().numpy()
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())


def test_dynamic_linear_and_lstm_on_the_device_match_the_cpu():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    model = Tagger().eval()
    cpu = lt.quantize(model, "int8_dynamic", progress=False)
    dev = lt.quantize(copy.deepcopy(model).to(DEVICE), "int8_dynamic", progress=False)
    assert isinstance(dev.lstm, QuantLSTM)
    _on_device(dev)
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = cpu(x), dev(x.to(DEVICE)).cpu()
    torch.testing.assert_close(got, expected, atol=0.02 * float(expected.abs().max()), rtol=0)


def test_gptq_on_the_device_picks_the_cpu_codes():
    model, calib = models.rounding_net(), list(models.smooth_images(128).split(32))
    cpu = lt.quantize(model, "w4a8", calib=calib, rounding="gptq", progress=False)
    dev = lt.quantize(copy.deepcopy(model).to(DEVICE), "w4a8", calib=_to(calib), rounding="gptq", progress=False)
    _on_device(dev)
    a, b = models.weight_codes(cpu), models.weight_codes(dev)
    assert list(a) == list(b) and len(a) == 4
    for name in a:
        assert b[name].device.type == DEVICE
        assert float((b[name].cpu() == a[name]).float().mean()) >= 0.99, name


def test_adaround_on_the_device_learns_codes_that_lower_the_output_error():
    model, calib = models.rounding_net(), list(models.smooth_images(256).split(32))
    test = models.smooth_images(128, seed=1).to(DEVICE)
    model = model.to(DEVICE)
    with torch.no_grad():
        ref = model(test)
    errors = {}
    for rounding in ("nearest", "adaround"):
        q = lt.quantize(model, "w4a8", calib=_to(calib), rounding=rounding, progress=False)
        _on_device(q)
        with torch.no_grad():
            errors[rounding] = float(((q(test) - ref) ** 2).mean())
    assert len(models.weight_codes(q)) == 4 and all(c.device.type == DEVICE for c in models.weight_codes(q).values())
    assert errors["adaround"] < 0.7 * errors["nearest"]


def test_sensitivity_analysis_on_the_device_ranks_the_layers_as_on_the_cpu():
    model, calib = models.convnet(), models.batches()
    results = {}
    for device in ("cpu", DEVICE):
        q = lt.quantize(copy.deepcopy(model).to(device), "w4a4", calib=_to(calib, device), progress=False)
        results[device] = lt.analyze(q, _to(models.batches(2, seed=5), device), progress=False)
    _on_device(q)
    cpu, dev = results["cpu"], results[DEVICE]
    assert [r.name for r in dev.layers] == [r.name for r in cpu.layers]
    for a, b in zip(cpu.layers, dev.layers, strict=True):
        assert b.own.sqnr_db == pytest.approx(a.own.sqnr_db, abs=0.1), a.name
        assert b.accumulated.sqnr_db == pytest.approx(a.accumulated.sqnr_db, abs=0.1), a.name
