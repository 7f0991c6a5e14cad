"""GPTQ rounding of quantized PyTorch models (lowbit.torch.gptq, lowbit.core.gptq)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit.torch as lt
from lowbit.core.gptq import round_matrix
from lowbit.errors import CalibrationError, SpecError
from lowbit.torch.rounding import LayerMoment
from lowbit.torch.switches import kept_float, wider_weights
from tests.torch import models


def _smooth(n: int, c: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are correlated, as real ones are: where GPTQ has
    something to exploit."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, size, size, generator=g).cumsum(-1).cumsum(-2) / size
    return base + 0.3 * torch.randn(n, c, size, size, generator=g)


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(24, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


def _codes(model) -> dict[str, torch.Tensor]:
    return {n: q.codes.clone() for n, q in lt.quantizers(model).items() if q.has_codes}


def test_uncorrelated_inputs_leave_nearest_rounding_and_correlated_ones_lower_the_output_error():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(1, 6, 20))
    scale = np.abs(w).max(axis=2, keepdims=True) / 7
    nearest = np.clip(np.rint(w / scale), -8, 7)
    q = round_matrix(w, scale, 0.0, -8, 7, np.eye(20)[None])
    np.testing.assert_array_equal(q, nearest)  # H = I: no error to cancel, every weight keeps its nearest code
    x = rng.normal(size=(5000, 20)) @ rng.normal(size=(20, 20))  # correlated inputs
    h = (x.T @ x / len(x))[None]
    q = round_matrix(w, scale, 0.0, -8, 7, h)
    assert q.min() >= -8 and q.max() <= 7 and np.all(q == np.rint(q))

    def output_error(codes):
        return float(np.mean((x @ (w[0] - codes[0] * scale[0]).T) ** 2))

    assert output_error(q) < 0.7 * output_error(nearest)


# Layers of every geometry rounding handles, and an input for each (tests of GPTQ's H and AdaRound's patches).
LAYERS = pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.Conv2d(4, 6, (1, 3), padding=(0, 1), dilation=(1, 2)),
        nn.Conv2d(4, 4, 3, padding="same", groups=4),
        nn.Conv2d(4, 6, 1),
        nn.Conv1d(4, 6, 3, stride=2, padding=1),
        nn.Conv2d(4, 6, 2, padding="valid"),
        nn.Linear(4, 6),
    ],
    ids=["strided-grouped", "dilated", "same-depthwise", "pointwise", "conv1d", "valid-even", "linear"],
)


def layer_input(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    shape = {nn.Linear: (5, 7, 4), nn.Conv1d: (3, 4, 11)}.get(type(layer), (3, 4, 9, 10))
    return torch.randn(*shape, generator=generator)


@LAYERS
def test_second_moment_gives_the_output_energy_of_any_weight(layer):
    """sum over outputs of (dW r)^2 = tr(dW H dW^T) * rows: checked against torch's own convolution, for a
    random weight change dW, so the patches H is made of are the ones the layer multiplies."""
    g = torch.Generator().manual_seed(0)
    x = layer_input(layer, g)
    moment = LayerMoment(layer)
    moment(layer, (x[:2],))
    moment(layer, (x[2:],))
    dw = torch.randn(layer.weight.shape, generator=g, dtype=torch.float64)
    if isinstance(layer, nn.Linear):
        out = x.double() @ dw.T
    else:
        conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
        out = conv(x.double(), dw, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    groups = getattr(layer, "groups", 1)
    m = dw.reshape(groups, dw.shape[0] // groups, -1)
    energy = float(torch.einsum("grd,gde,gre->", m, moment.moment.sum, m))
    assert energy == pytest.approx(float((out**2).sum()), rel=1e-5)  # float32 products, float64 sums
    rows_per_output = out.numel() // out.shape[1 if not isinstance(layer, nn.Linear) else -1]
    assert moment.moment.count == rows_per_output


def test_gptq_lowers_the_output_error_on_new_data_and_keeps_scales():
    model = _net()
    calib = list(_smooth(256).split(32))
    test = _smooth(128, seed=1)
    with torch.no_grad():
        ref = model(test)
    errors, scales = {}, {}
    for rounding in ("nearest", "gptq"):
        q = lt.quantize(model, "w4a8", calib=calib, rounding=rounding, progress=False)
        with torch.no_grad():
            errors[rounding] = float(((q(test) - ref) ** 2).mean())
        scales[rounding] = {n: t.scale.clone() for n, t in lt.quantizers(q).items() if t.is_weight}
    assert errors["gptq"] < 0.8 * errors["nearest"]
    for n, s in scales["nearest"].items():
        torch.testing.assert_close(scales["gptq"][n], s, rtol=0, atol=0)  # only the codes change
    codes = _codes(q)
    assert set(codes) == {f"{i}.weight_quantizer" for i in (0, 2, 4, 7)}
    for name, c in codes.items():
        spec = lt.quantizers(q)[name].spec
        assert c.shape == q.get_submodule(name.rsplit(".", 1)[0]).weight.shape
        assert int(c.min()) >= spec.qmin and int(c.max()) <= spec.qmax


def test_kept_float_layers_run_their_original_weights_and_wider_weights_restore_the_codes():
    model = _net()
    calib = list(_smooth(256).split(32))
    q = lt.quantize(model, "w4a8", calib=calib, rounding="gptq", progress=False)
    x = _smooth(4, seed=2)
    with torch.no_grad(), kept_float(q, ["0", "2", "4", "7"]):
        torch.testing.assert_close(q(x), model(x))
    before, layer = _codes(q), q[2]
    with torch.no_grad():
        out = q(x)
    with wider_weights(q, ["2"]):
        assert layer.weight_quantizer.spec.bits == 8 and not layer.weight_quantizer.has_codes
    after = _codes(q)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(q(x), out, rtol=0, atol=0)
    layer.weight_quantizer.set_range(-1.0, 1.0)  # a new scale: the codes no longer apply
    assert not layer.weight_quantizer.has_codes


def test_codes_survive_state_dict_and_export_and_training_drops_them(tmp_path):
    model = _net()
    calib = list(_smooth(256).split(32))
    q = lt.quantize(model, "w4a8", calib=calib, rounding="gptq", progress=False)
    x = _smooth(3, seed=4)
    with torch.no_grad():
        expected = q(x)
    fresh = lt.quantize(model, "w4a8", calib=calib, progress=False)
    fresh.load_state_dict(q.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    path = lt.export_onnx(q, x, tmp_path / "gptq.onnx")
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    q.train()
    q(x)  # a QAT step: the weight will change, the codes no longer fit it
    assert not _codes(q)


def test_gptq_on_a_quantized_model_and_bad_input():
    model = models.convnet()
    q = lt.quantize(model, "w4a8", calib=models.batches(), progress=False)
    with pytest.raises(CalibrationError, match="cannot round nope"):
        lt.gptq(q, models.batches(), names=["nope"])
    assert lt.gptq(q, models.batches(8), names=["0"], progress=False) == ["0"]
    # One batch of 8 images: 8 rows for the Linear's 8 inputs, too few to know H; the convs see 256 patches each.
    assert lt.gptq(q, models.batches(1), progress=False) == ["0", "3"]
    with pytest.raises(SpecError, match="rounding must be one of"):
        lt.quantize(model, "w4a8", calib=models.batches(), rounding="adaquant")
    with pytest.raises(CalibrationError, match="needs calibration data"):
        lt.quantize(model, "w4a16_group128", rounding="gptq")
    one_shot = iter(models.batches(8))  # read twice: calibration, then GPTQ's statistics
    g = lt.quantize(model, "w4a8", calib=one_shot, rounding="gptq", progress=False)
    assert _codes(g)
    with pytest.raises(CalibrationError, match="codes outside"):
        g[0].weight_quantizer.set_codes(torch.full(g[0].weight.shape, 9))


def test_a_quantized_model_is_in_eval_mode_down_to_its_quantizers():
    q = lt.quantize(models.convnet(), "w4a8", calib=models.batches(), progress=False)
    assert not any(m.training for m in q.modules())


@LAYERS
def test_one_conv_patch_helper_serves_both_roundings(layer):
    """Patches at every position (GPTQ's) and gathered at chosen positions (AdaRound's) are the same rows, and
    times the weight they give the layer's output."""
    from lowbit.torch.rounding import conv_patches, output_positions

    if isinstance(layer, nn.Linear):
        return
    x = layer_input(layer, torch.Generator().manual_seed(2))
    every = conv_patches(layer, x, "test")
    n = output_positions(layer, x, "test")
    assert every.shape[0] == n
    chosen = torch.tensor([0, n // 2, n - 1])
    assert torch.equal(conv_patches(layer, x, "test", chosen), every[chosen])
    g = layer.groups
    w = layer.weight.detach().reshape(g, layer.out_channels // g, -1)
    y = torch.einsum("rgk,gok->rgo", every, w).reshape(n, -1)
    conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
    ref = conv(x, layer.weight.detach(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
    ref = ref.reshape(x.shape[0], layer.out_channels, -1).transpose(1, 2).reshape(n, -1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
