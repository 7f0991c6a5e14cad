"""Binary, ternary, 2-bit and log2 weights in lowbit.torch: fake quantization, gradients, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.core import QuantSpec, dequantize, qparams, qparams_from_tensor, quantize
from lowbit.errors import SpecError
from lowbit.recipe import Config, LayerConfig, QuantizerConfig

ACT = QuantizerConfig(signed=None, symmetric=None, method=None)
WEIGHTS = {
    "binary": QuantizerConfig(bits=1, granularity="channel"),
    "ternary": QuantizerConfig(bits=2, format="ternary", granularity="channel"),
    "int2": QuantizerConfig(bits=2, granularity="channel"),
    "log2": QuantizerConfig(bits=4, format="log2", granularity="channel"),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 4),
    ).eval()  # fmt: skip


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]


def _quantized(kind: str) -> nn.Module:
    return lt.quantize(_model(), Config(LayerConfig(ACT, WEIGHTS[kind])), calib=_batches(), progress=False)


@pytest.mark.parametrize("kind", ["binary", "ternary", "log2"])
def test_weights_equal_core_fake_quant(kind):
    q = _quantized(kind)
    layer = q[2]
    w = layer.weight.detach().numpy()
    spec = layer.weight_quantizer.spec
    if kind == "log2":
        scale, zp = qparams(w.reshape(8, -1).min(1), w.reshape(8, -1).max(1), spec)
    else:
        scale, zp = qparams_from_tensor(w, spec)
    expected = dequantize(quantize(w, scale, zp, spec), scale, zp, spec)
    got = layer.weight_quantizer(layer.weight).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    levels = {"binary": 2, "ternary": 3, "log2": 15}[kind]
    assert len(np.unique(got[0])) <= levels


def test_binary_scale_follows_the_weight_and_gradient_clips():
    q = _quantized("binary")
    wq = q[0].weight_quantizer
    with torch.no_grad():
        q[0].weight.mul_(2.0)
        q[0].weight[0, 0, 0, 0] = 3.0  # beyond the clip: no gradient
    out = wq(q[0].weight)
    assert torch.allclose(wq.scale, q[0].weight.detach().abs().mean((1, 2, 3)))
    w = q[0].weight
    w.grad = None
    out.sum().backward()
    grad = w.grad
    assert grad[0, 0, 0, 0] == 0 and torch.all(grad[w.abs() <= 1] == 1)


@pytest.mark.parametrize("kind", list(WEIGHTS))
def test_qat_trains_and_export_scores_the_same(kind, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    q = _quantized(kind).train()
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    x = _batches()[0]
    before = q[0].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        q(x).pow(2).mean().backward()
        opt.step()
    assert not torch.equal(before, q[0].weight.detach())
    q.eval()
    path = lt.export_onnx(q, x, tmp_path / f"{kind}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, q(x).detach().numpy(), atol=1e-5)


def test_export_stores_int8_codes(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    path = lt.export_onnx(_quantized("ternary"), _batches()[0], tmp_path / "t.onnx")
    g = onnx.load(str(path)).graph
    tensors = [numpy_helper.to_array(i) for i in g.initializer]
    tensors += [numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"]
    weights = [t for t in tensors if t.ndim >= 2]
    assert len(weights) == 3 and all(t.dtype == np.int8 and set(np.unique(t)) <= {-1, 0, 1} for t in weights)


def test_two_bit_weights_are_int2_from_opset_25_and_run_the_same(tmp_path):
    import onnx
    import onnxruntime as ort

    q, x = _quantized("int2"), _batches()[0]
    kinds = {}
    for opset in (21, 25):
        path = lt.export_onnx(q, x, tmp_path / f"w2_{opset}.onnx", opset=opset)
        kinds[opset] = {i.data_type for i in onnx.load(str(path)).graph.initializer}
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, q(x).detach().numpy(), atol=1e-5)
    int2 = onnx.TensorProto.INT2
    assert int2 in kinds[25] and int2 not in kinds[21]


def test_activations_and_learned_scales_refused():
    with pytest.raises(SpecError, match=r"bits=1.*weights only"):
        LayerConfig(QuantizerConfig(bits=1), None)
    with pytest.raises(SpecError, match="learn_scale"):
        QuantizerConfig(bits=2, format="ternary", learn_scale=True)
    cfg = Config(LayerConfig(ACT, WEIGHTS["binary"])).with_learned_scales()
    assert cfg.default.weight.learn_scale is False and cfg.default.input.learn_scale is True
    with pytest.raises(SpecError, match="learn_scale"):
        lt.TensorQuantizer(QuantSpec(bits=1), learn_scale=True)


def test_two_bit_lsq_learns_its_scale():
    cfg = Config(LayerConfig(ACT, WEIGHTS["int2"])).with_learned_scales()
    q = lt.quantize(_model(), cfg, calib=_batches(), progress=False, qat=True).train()
    wq = q[0].weight_quantizer
    before = wq.scale.detach().clone()
    q(_batches()[0]).pow(2).mean().backward()
    assert wq.scale.grad is not None and bool(wq.scale.grad.abs().sum() > 0)
    torch.optim.SGD([wq.scale], lr=0.1).step()
    assert not torch.equal(before, wq.scale.detach())


@pytest.mark.parametrize("name", ["w1a8", "w2a8", "ternary_a8", "w4a8_log2"])
def test_presets_round_trip_and_keep_the_ends_at_int8(name, tmp_path):
    from lowbit.recipe import load, preset, save

    assert load(save(preset(name), tmp_path / "r.json")) == preset(name)
    q = lt.quantize(_model(), name, calib=_batches(), progress=False)
    bits = [q[i].weight_quantizer.spec.bits for i in (0, 2, 5)]
    low = lt.preset(name).default.weight.bits
    assert bits == ([8, low, 8] if name != "w4a8_log2" else [4, 4, 4])


def test_packed_weight_bytes_counts_bits_times_weights():
    from lowbit.torch.size import packed_weight_bytes

    q = lt.quantize(_model(), "w1a8", calib=_batches(), progress=False)
    size = packed_weight_bytes(q)
    assert size["binary"] == 8 * 8 * 9 / 8 and size["int8"] == 8 * 3 * 9 + 4 * 512
    assert size["scales"] == 4 * (8 + 8 + 4) and size["float"] == 4 * (8 + 8 + 4)
    assert size["total"] == size["codes"] + size["scales"] + size["float"]


@pytest.mark.parametrize("name", ["w1a8", "ternary_a8"])
def test_qat_with_batchnorm_kept_training(name):
    from tests.torch.models import batches, convnet

    q = lt.quantize(convnet(), name, calib=batches(), qat=True, progress=False).train()
    q(batches()[0]).sum().backward()
    layer = q[3]  # the depthwise conv, neither first nor last: low-bit weights, its BatchNorm kept
    wq = layer.weight_quantizer
    assert wq.spec.bits in (1, 2) and wq.scale.shape == (8,) and layer.weight.grad is not None
