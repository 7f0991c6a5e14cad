from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import lowbit.torch as lt
from tests.torch import models


def _convbn(model):
    return [m for m in model.modules() if isinstance(m, lt.QuantConvBn2d)]


def test_qat_keeps_batchnorm_and_in_eval_mode_equals_the_folded_ptq_model():
    model, data = models.convnet(), models.batches()
    # Ranges calibrated on inference's activations, as PTQ's (QAT's default is training's: test_qat_ranges.py)
    q = lt.quantize(model, "int8", calib=data, qat=True, progress=False, bn_stats="running")
    ptq = lt.quantize(model, "int8", calib=data, progress=False)
    assert len(_convbn(q)) == 2 and all(isinstance(m.bn, nn.BatchNorm2d) for m in _convbn(q))
    x = models.batches(1, seed=4)[0]
    with torch.no_grad():
        torch.testing.assert_close(q(x), ptq(x), atol=1e-6, rtol=1e-5)


def test_in_training_the_batchnorm_normalises_and_tracks_the_convolution_output():
    model, data = models.convnet(), models.batches()
    q = lt.quantize(model, "int8", calib=data, qat=True, progress=False)
    layer = _convbn(q)[0]
    layer.bn.momentum = 1.0  # running statistics = the last batch's
    q.train()
    x = models.batches(1, seed=9, batch=32)[0]
    with torch.no_grad():
        out = layer(x)
        conv_out = nn.functional.conv2d(x, model[0].weight, model[0].bias, padding=1)  # the float, unfolded conv
    # Normalised by the batch statistics: per-channel mean beta, std |gamma|.
    torch.testing.assert_close(out.mean((0, 2, 3)), layer.bn.bias.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3), unbiased=False), layer.bn.weight.detach().abs(), atol=2e-3, rtol=0)
    # The running statistics are those of the real convolution output (up to int8 weight/input rounding).
    torch.testing.assert_close(layer.bn.running_mean, conv_out.mean((0, 2, 3)), atol=0.02, rtol=0.02)
    torch.testing.assert_close(layer.bn.running_var, conv_out.var((0, 2, 3)), atol=0.02, rtol=0.03)


def test_frozen_batchnorm_statistics_stop_changing():
    q = lt.quantize(models.convnet(), "int8", calib=models.batches(), qat=True, progress=False)
    assert lt.freeze_bn_stats(q) == 2
    q.train()
    before = [m.bn.running_mean.clone() for m in _convbn(q)]
    x = models.batches(1, seed=9)[0]
    with torch.no_grad():
        out = q(x)
    assert all(torch.equal(a, m.bn.running_mean) for a, m in zip(before, _convbn(q), strict=True))
    q.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, q(x))  # frozen: training computes what inference computes
    lt.freeze_bn_stats(q, frozen=False)
    q.train()
    with torch.no_grad():
        q(x)
    assert not torch.equal(before[0], _convbn(q)[0].bn.running_mean)


def test_qat_with_batchnorm_trains_and_exports(tmp_path):
    torch.manual_seed(0)
    model, data = models.convnet(), models.batches(8, batch=16)
    target = [model(x).argmax(1) for x in data]
    w4 = lt.Config(lt.LayerConfig(lt.QuantizerConfig(bits=4, method="mse", learn_scale=True),
                                  lt.QuantizerConfig(bits=4, granularity="channel")))  # fmt: skip
    q = lt.quantize(model, w4, calib=data[:2], qat=True, progress=False)
    start, end = models.fit(q, data, target, torch.optim.Adam(q.parameters(), lr=1e-2), epochs=20)
    assert end < 0.5 * start
    x = models.batches(1, seed=11)[0]
    path = lt.export_onnx(q, x, tmp_path / "qat.onnx")
    # ONNX Runtime computes every quantized tensor as the fake quantization did, up to one step where its float
    # convolution lands on the other side of a rounding boundary (4-bit steps are coarse: 0.3% of the values here).
    proto = onnx.load(path)
    dq = [n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in dq)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x.numpy()}), strict=True))
    torch_values = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: torch_values.__setitem__(n, o.numpy()))
             for n, m in q.named_modules() if isinstance(m, lt.TensorQuantizer)]  # fmt: skip
    with torch.no_grad():
        ref = q(x).numpy()
    for h in hooks:
        h.remove()
    assert len(torch_values) == len(dq) == 6
    differ = total = 0
    for name, value in torch_values.items():
        got = onnx_values[f"/{name.replace('.', '/')}/DequantizeLinear_output_0"]
        step = q.get_submodule(name).scale.detach().numpy().max()
        assert np.abs(got - value).max() <= step * 1.001, name
        differ, total = differ + int((np.abs(got - value) > 1e-5).sum()), total + value.size
    assert differ <= 0.01 * total
    np.testing.assert_allclose(onnx_values["output"], ref, atol=0.05 * np.abs(ref).max())
