from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.errors import CalibrationError, LowbitError, SpecError
from lowbit.paths import PathError
from lowbit.torch.layers import QuantMixin
from tests.torch import models


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def _last_input_step(model) -> float:
    layers = [m for m in model.modules() if isinstance(m, QuantMixin)]
    return float(layers[-1].input_quantizer.scale.max())


@pytest.mark.parametrize("config", ["int8", "w8a8_asym", "w4a8", "w4a4"])
def test_onnx_runtime_computes_what_the_fake_quantization_computes(tmp_path, config):
    q = lt.quantize(models.convnet(), config, calib=models.batches(), progress=False)
    x = models.batches(1, seed=9)[0]
    path = lt.export_onnx(q, x, tmp_path / "q.onnx")
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        expected = q(x).numpy()
    got = _ort(path, x)
    # Same codes; the float sums may differ in order: far less than one quantization step of the last layer's input.
    assert np.abs(got - expected).max() < 0.01 * _last_input_step(q)
    other = models.batches(1, batch=3, seed=10)[0]  # another batch size runs too
    assert _ort(path, other).shape == (3, 4)


def test_weights_are_stored_as_integers(tmp_path):
    q = lt.quantize(models.convnet(), "int8", calib=models.batches(), progress=False)
    path = lt.export_onnx(q, models.batches(1)[0], tmp_path / "q.onnx")
    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6  # 3 activations, 3 weights
    weights = [i for i in m.graph.initializer if len(i.dims) >= 2]
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)
    per_channel = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.attribute]
    assert {a.i for n in per_channel for a in n.attribute if a.name == "axis"} == {0}


def test_export_before_calibration_or_of_dynamic_quantizers_is_a_clear_error(tmp_path):
    model = models.convnet()
    with pytest.raises(CalibrationError, match="no enabled quantizer"):
        lt.export_onnx(model, models.batches(1)[0], tmp_path / "f.onnx")
    q = lt.quantize(models.MLP(), "int8_dynamic", progress=False)
    with pytest.raises(SpecError, match="--dynamic"):
        lt.export_onnx(q, torch.randn(2, 16), tmp_path / "d.onnx")
    layer = lt.QuantLinear.from_float(nn.Linear(4, 2), lt.preset("int8").default, "fc")
    layer.calibrate_weight()
    with pytest.raises(CalibrationError, match="not calibrated yet"):
        lt.export_onnx(layer, torch.randn(1, 4), tmp_path / "n.onnx")
    wide = lt.Config(lt.LayerConfig(lt.QuantizerConfig(bits=16), lt.QuantizerConfig(granularity="channel")))
    q = lt.quantize(models.convnet(), wide, calib=models.batches(), progress=False)
    with pytest.raises(SpecError, match="more than 8 bits"):
        lt.export_onnx(q, models.batches(1)[0], tmp_path / "w.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv1d(4, 6, 3, padding=1), (2, 4, 10)),
        (nn.Conv3d(2, 4, 3, padding=1), (2, 2, 5, 5, 5)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2), (2, 4, 5, 5)),
    ],
)
def test_other_layer_kinds_quantize_and_export(tmp_path, layer, shape):
    torch.manual_seed(0)
    model = nn.Sequential(layer).eval()
    data = [torch.randn(*shape) for _ in range(3)]
    q = lt.quantize(model, "int8", calib=data, progress=False)
    assert type(q[0]) is lt.MODULE_MAP[type(layer)]
    x = data[0]
    ref = model(x)
    assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()
    path = lt.export_onnx(q, x, tmp_path / "q.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(_ort(path, x), q(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("weight", [lt.QuantizerConfig(bits=4, granularity="channel"),
                                    lt.QuantizerConfig(granularity="channel", narrow_range=True)])  # fmt: skip
def test_weights_that_left_their_range_in_training_are_clipped_to_it_in_onnx(tmp_path, weight):
    cfg = lt.Config(lt.LayerConfig(lt.QuantizerConfig(), weight))
    q = lt.quantize(models.MLP(), cfg, calib=[torch.randn(32, 16)], progress=False)
    with torch.no_grad():
        q.fc1.weight.mul_(3)  # as QAT may move weights past the calibrated scale
    x = torch.randn(8, 16)
    path = lt.export_onnx(q, x, tmp_path / "q.onnx")
    codes = [onnx.numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer if i.data_type == 3]
    fc1 = next(c for c in codes if c.shape == (32, 16))
    wq = q.fc1.weight_quantizer
    with torch.no_grad():
        expected = (wq(q.fc1.weight) / wq.scale.reshape(-1, 1)).round().numpy()
    assert expected.min() == wq.spec.qmin  # some did saturate
    np.testing.assert_array_equal(fc1, expected)  # the fake quantization's codes, not int8's wider ones


def test_opset_21_stores_4_bit_weights_as_int4(tmp_path):
    q = lt.quantize(models.convnet(), "w4a4", calib=models.batches(), progress=False)
    x = models.batches(1, seed=9)[0]
    path = lt.export_onnx(q, x, tmp_path / "q.onnx", opset=21)
    m = onnx.load(str(path))
    assert m.opset_import[0].version == 21
    weights = [i for i in m.graph.initializer if len(i.dims) >= 2]
    assert len(weights) == 3 and all(i.data_type == onnx.TensorProto.INT4 for i in weights)
    types = {i.name: i.data_type for i in m.graph.initializer}
    weight_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in types]
    assert len(weight_dq) == 3 and all(types[n.input[2]] == onnx.TensorProto.INT4 for n in weight_dq)
    # Activations stay int8 Q/DQ on the 4-bit grid (ONNX Runtime's int4 QuantizeLinear does not saturate).
    assert [n.op_type for n in m.graph.node].count("QuantizeLinear") == 3
    with torch.no_grad():
        expected = q(x).numpy()
    assert np.abs(_ort(path, x) - expected).max() < 0.01 * _last_input_step(q)
    assert path.stat().st_size < lt.export_onnx(q, x, tmp_path / "q17.onnx").stat().st_size


def test_per_group_weights_need_opset_21_and_export_as_blocked_int4(tmp_path):
    cfg = lt.Config(lt.LayerConfig(None, lt.QuantizerConfig(bits=4, granularity="group", group_size=8)))
    q = lt.quantize(models.MLP(), cfg, progress=False)
    x = torch.randn(3, 16)
    with pytest.raises(SpecError, match="opset=21"):
        lt.export_onnx(q, x, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
    path = lt.export_onnx(q, x, tmp_path / "q.onnx", opset=21)
    m = onnx.load(str(path))
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert [n.op_type for n in m.graph.node].count("QuantizeLinear") == 0  # weights only, folded to integers
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 8 for n in dq)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(path, x), q(x).numpy(), atol=1e-5)


def test_an_opset_out_of_range_is_a_clear_error(tmp_path):
    q = lt.quantize(models.MLP(), "int8_dynamic", progress=False)
    with pytest.raises(SpecError, match="opset must be 13"):
        lt.export_onnx(q, torch.randn(2, 16), tmp_path / "q.onnx", opset=26)


def test_the_bias_is_on_the_integer_grid_onnx_runtime_adds_it_on(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.3333, -0.1234, 0.0777, 0.5]))
    q = lt.quantize(model, "w4a4", calib=models.batches(), progress=False)
    layer = q[0]
    step = (layer.input_quantizer.scale * layer.weight_quantizer.scale).detach()
    assert step.min() > 1e-3  # coarse enough that a float bias would be visibly off the grid
    bias = layer._bias(layer.bias)
    torch.testing.assert_close(bias / step, torch.round(bias / step), atol=1e-4, rtol=0)
    assert not torch.equal(bias, layer.bias)
    x = models.batches(1, seed=9)[0]
    path = lt.export_onnx(q, x, tmp_path / "q.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(_ort(path, x), q(x).numpy(), atol=2e-5)  # ONNX Runtime rounds it so too
    out = q(x)
    out.sum().backward()
    assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0  # straight-through


def test_a_batchnorm_channel_that_saw_a_constant_folds_to_its_beta():
    model = models.convnet()
    with torch.no_grad():  # channel 2 of the first block is dead: bias -5, zero weights, ReLU -> always 0
        model[0].weight[2], model[0].bias[2] = 0.0, -5.0
        model[1].running_mean[2], model[1].running_var[2], model[1].bias[2] = -5.0, 0.0, -1.0
        # so the depthwise convolution's channel 2 sees zeros: its BatchNorm saw a constant 0
        model[4].running_mean[2], model[4].running_var[2] = 0.0, 0.0
    assert model[3].weight[2].abs().sum() > 0  # weights that never mattered
    q = lt.quantize(model, "int8", calib=models.batches(), progress=False)
    assert torch.all(q[3].weight[2] == 0)  # not amplified by gamma / sqrt(eps)
    assert float(q[3].bias[2].detach()) == pytest.approx(float(model[4].bias[2].detach()))
    qat = lt.quantize(model, "int8", calib=models.batches(), qat=True, progress=False)
    assert torch.all(qat[3]._weight_to_quantize()[2] == 0)
    x = models.batches(1, seed=9)[0]
    for m in (q, qat):
        for qz in lt.quantizers(m).values():
            qz.mode = "disabled"
        with torch.no_grad():
            torch.testing.assert_close(m(x), model(x), atol=1e-5, rtol=1e-4)


def test_example_inputs_of_the_wrong_shape_are_a_one_line_error_naming_them(tmp_path):
    q = lt.quantize(models.convnet(), "int8", calib=models.batches(), progress=False)
    with pytest.raises(SpecError) as info:
        lt.export_onnx(q, torch.randn(2, 5, 16, 16), tmp_path / "q.onnx")
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, LowbitError)
    assert message.startswith("example_inputs (a tensor of shape (2, 5, 16, 16)) do not fit the model")
    assert "shaped like one batch of its calibration data" in message
    assert not list(tmp_path.iterdir())


def test_an_output_path_that_cannot_be_written_is_refused_before_tracing(tmp_path, monkeypatch):
    q = lt.quantize(models.convnet(), "int8", calib=models.batches(), progress=False)
    x = models.batches(1)[0]

    def never(*args, **kwargs):
        raise AssertionError("the export traced the model before checking its output")

    monkeypatch.setattr(torch.onnx, "export", never)
    (tmp_path / "afile").write_text("")
    with pytest.raises(PathError, match=r"^path .*afile/q\.onnx: .*afile is a file, not a folder"):
        lt.export_onnx(q, x, tmp_path / "afile" / "q.onnx")
    with pytest.raises(PathError, match="is a folder"):
        lt.export_onnx(q, x, tmp_path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr("lowbit.paths.tempfile.mkstemp", denied)  # as root, chmod would not stop a write
    with pytest.raises(PathError) as info:
        lt.export_onnx(q, x, tmp_path / "ro" / "q.onnx")
    assert str(info.value) == (
        f"path {tmp_path / 'ro' / 'q.onnx'}: cannot write in {tmp_path / 'ro'} (Permission denied); "
        "choose a folder you can write to"
    )
    assert isinstance(info.value, LowbitError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ro"] and not list((tmp_path / "ro").iterdir())


def test_the_exported_model_records_the_recipe_it_was_quantized_with(tmp_path):
    import json

    from lowbit.recipe import from_dict, preset

    q = lt.quantize(models.convnet(), "int8", calib=models.batches(), rounding="gptq", progress=False)
    path = lt.export_onnx(q, models.batches(1)[0], tmp_path / "q.onnx")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    recipe = from_dict(json.loads(props["lowbit.recipe"]))
    assert recipe.target == "trt" and recipe.rounding == "gptq"
    assert recipe.default.input.signed and recipe.default.input.method == "mse"  # resolved for TensorRT
    assert preset("int8").default.input.signed is None  # the preset itself leaves both to the target
