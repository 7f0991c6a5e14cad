"""FP8 in lowbit.torch: fake quantization bit for bit lowbit.core's, its gradients, PTQ/QAT, and the ONNX export
that ONNX Runtime runs to the same numbers."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.core import QuantSpec, fake_quant, qparams
from lowbit.errors import SpecError
from lowbit.recipe import preset
from lowbit.torch import TensorQuantizer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fake_quant_matches_core_bit_for_bit(name):
    spec = QuantSpec(format=name, axis=0)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3000)) * np.exp2(rng.uniform(-20, 20, (4, 3000)))).astype(np.float32)
    scale, zp = qparams(-np.abs(x).max(axis=1) * 0.3, np.abs(x).max(axis=1) * 0.3, spec)  # some saturate
    q = TensorQuantizer(spec)
    q.set_range(-np.abs(x).max(axis=1) * 0.3, np.abs(x).max(axis=1) * 0.3)
    q.mode = "quantize"
    got = q(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, fake_quant(x, scale, zp, spec))


def test_straight_through_gradient_and_lsq_scale():
    spec = QuantSpec(format="fp8_e4m3")
    q = TensorQuantizer(spec, learn_scale=True)
    q.set_range(-448.0, 448.0)  # scale 1
    q.mode = "quantize"
    x = torch.tensor([0.3, -17.2, 500.0, -1000.0], requires_grad=True)
    q.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q(x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 1.0, 0.0, 0.0])
    # d/ds: fp8(x/s) - x/s inside, +-448 outside, times LSQ's 1 / sqrt(n * 448)
    inside = (0.3125 - 0.3) + (-18.0 + 17.2)  # 17.2 rounds to 18 (1.125 * 2^4)
    expected = (inside + 448.0 - 448.0) / np.sqrt(4 * 448.0)
    assert float(q.scale.grad) == pytest.approx(expected, rel=1e-4)
    assert q.real_range()[1].item() == 448.0


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_ptq_export_runs_in_onnx_runtime_with_the_same_numbers(name, tmp_path):
    model = _model()
    x = torch.randn(8, 3, 8, 8)
    quantized = lt.quantize(model, preset(name), calib=[x], progress=False)
    expected = quantized(x).detach().numpy()
    path = lt.export_onnx(quantized, x[:1], tmp_path / "m.onnx")
    proto = onnx.load(path)
    assert proto.opset_import[0].version == 19
    qtype = onnx.TensorProto.FLOAT8E4M3FN if name == "fp8_e4m3" else onnx.TensorProto.FLOAT8E5M2
    weights = [i for i in proto.graph.initializer if i.data_type == qtype and len(i.dims) > 1]
    assert len(weights) == 2  # both weights stored as FP8, one byte each
    zps = {n.input[2] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    consts = {n.output[0]: n.attribute[0].t.data_type for n in proto.graph.node if n.op_type == "Constant"}
    consts.update({i.name: i.data_type for i in proto.graph.initializer})
    assert {consts[z] for z in zps} == {qtype}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected - model(x).detach().numpy()).max() < 0.2


def test_export_refuses_an_opset_below_19(tmp_path):
    quantized = lt.quantize(_model(), preset("fp8"), calib=[torch.randn(4, 3, 8, 8)], progress=False)
    with pytest.raises(SpecError, match=r"opset=17: .*format .fp8_e4m3.*opset=19"):
        lt.export_onnx(quantized, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", opset=17)


def test_weight_roundings_that_choose_integer_codes_are_refused():
    with pytest.raises(SpecError, match="rounding='gptq' chooses integer codes; fp8_e4m3"):
        lt.quantize(_model(), preset("fp8"), calib=[torch.randn(4, 3, 8, 8)], rounding="gptq", progress=False)
    q = TensorQuantizer(QuantSpec(format="fp8_e4m3"))
    q.is_weight = True
    q.set_range(-1.0, 1.0)
    with pytest.raises(Exception, match="format 'fp8_e4m3' rounds to nearest"):
        q.set_codes(torch.zeros(3, dtype=torch.int32))


def test_qat_trains_and_mse_calibration_fits_fp8():
    torch.manual_seed(1)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,))
    cfg = preset("fp8").with_learned_scales().with_method("mse")
    model = lt.quantize(_model(), cfg, calib=[x], qat=True, progress=False).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    act = model[0].input_quantizer
    amax = float(x.abs().max())
    assert 0.2 * amax < float(act.real_range()[1]) <= amax * 1.01  # MSE on the FP8 grid: never past the data
