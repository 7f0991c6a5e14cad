from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.core import QuantSpec, qparams
from lowbit.core import fake_quant as np_fake_quant
from lowbit.errors import CalibrationError
from lowbit.torch import TensorQuantizer, fake_quant


@pytest.mark.parametrize(
    "spec, shape",
    [
        (QuantSpec(), (4, 6)),
        (QuantSpec(bits=4, axis=0), (4, 6)),
        (QuantSpec(bits=8, signed=False, symmetric=False), (2, 3, 5)),
        (QuantSpec(bits=4, axis=1, group_size=4), (3, 10)),
        (QuantSpec(bits=8, narrow_range=True, axis=1), (2, 3, 4)),
    ],
)
def test_fake_quant_matches_the_numpy_reference(spec, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    from lowbit.core import layout

    lo, hi = layout.reduce(x * 0.7, spec, "min"), layout.reduce(x * 0.7, spec, "max")  # some values clip
    scale, zp = qparams(lo, hi, spec)
    expected = np_fake_quant(x, scale, zp, spec)
    got = fake_quant(torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp.astype(np.float32)), spec)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_straight_through_gradient_is_one_inside_and_zero_outside():
    spec = QuantSpec()
    x = torch.tensor([-3.0, -0.5, 0.26, 0.9, 2.5], requires_grad=True)
    y = fake_quant(x, torch.tensor(1 / 127), torch.tensor(0.0), spec)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_learned_scale_gets_the_lsq_gradient():
    spec = QuantSpec(bits=4)  # codes -8..7
    x = torch.tensor([-2.0, -0.33, 0.1, 0.74, 5.0])
    s = torch.tensor(0.1, requires_grad=True)
    fake_quant(x, s, torch.tensor(0.0), spec).sum().backward()
    v = x / 0.1
    # round(v) - v where the rounded code is on the grid (7.4 rounds to 7: inside), else the bound (as
    # torch's own learnable fake quantization)
    inside = (torch.round(v) >= -8) & (torch.round(v) <= 7)
    expected = torch.where(inside, torch.round(v) - v, torch.clamp(torch.round(v), -8, 7)).sum()
    assert inside.tolist() == [False, True, True, True, False]
    assert s.grad.item() == pytest.approx(expected.item(), abs=1e-5)


def test_calibrate_then_quantize_with_a_lowbit_calibrator():
    q = TensorQuantizer(QuantSpec(), method="percentile", method_options={"percentile": 99.0})
    assert q.mode == "calibrate" and not q.calibrated
    x = torch.linspace(-1, 1, 10001)
    x[0] = -100.0  # one outlier the 99th percentile ignores
    assert torch.equal(q(x), x)  # calibrate mode passes the tensor through
    q.load_calibration()
    assert q.mode == "quantize" and q.calibrated
    assert 0.9 / 127 < q.scale.item() < 1.1 / 127
    assert q(torch.tensor([-100.0])).item() == pytest.approx(-128 * q.scale.item())


def test_per_channel_quantizer_takes_min_max_per_slice():
    q = TensorQuantizer(QuantSpec(axis=0))
    q(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
    q.load_calibration()
    np.testing.assert_allclose(q.scale.numpy(), [2 / 127, 0.5 / 127], rtol=1e-6)


def test_quantize_before_calibration_is_a_clear_error():
    from lowbit.errors import CalibrationError

    q = TensorQuantizer(QuantSpec())
    q.mode = "quantize"
    with pytest.raises(CalibrationError, match="has no scale yet"):
        q(torch.ones(3))
    with pytest.raises(CalibrationError, match="no calibration data reached"):
        q.load_calibration()


def test_dynamic_quantizer_takes_each_batch_range():
    q = TensorQuantizer(QuantSpec(signed=False, symmetric=False), dynamic=True)
    assert q.mode == "quantize" and q.calibrated
    x = torch.tensor([0.0, 1.0, 2.0, 255.0])
    torch.testing.assert_close(q(x), x)  # the batch's own range: scale 1, exact
    torch.testing.assert_close(q(x / 10), x / 10)


def test_observers_follow_the_batches_then_freeze():
    q = TensorQuantizer(QuantSpec())
    q(torch.tensor([-1.0, 1.0]))
    q.load_calibration()
    q.train()
    q.observe_steps, q.momentum = 2, 0.5
    q(torch.tensor([-3.0, 3.0]))
    assert q.scale.item() == pytest.approx(2.0 / 127)
    q(torch.tensor([-3.0, 3.0]))
    assert q.scale.item() == pytest.approx(2.5 / 127)
    q(torch.tensor([-3.0, 3.0]))  # frozen now
    assert q.scale.item() == pytest.approx(2.5 / 127) and q.observe_steps == 0


def test_state_dict_round_trip_restores_scales():
    q = TensorQuantizer(QuantSpec(axis=0))
    q(torch.randn(3, 4))
    q.load_calibration()
    fresh = TensorQuantizer(QuantSpec(axis=0))
    fresh.load_state_dict(q.state_dict())
    fresh.mode = "quantize"
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), q(x))


def test_a_learned_scale_pushed_below_zero_is_clamped_and_export_says_so(tmp_path):
    import lowbit.torch as lt

    q = lt.quantize(
        torch.nn.Sequential(torch.nn.Linear(4, 2)),
        lt.preset("int8").with_learned_scales(),
        calib=[torch.randn(8, 4)],
        progress=False,
    )
    with torch.no_grad():
        q[0].input_quantizer.scale.fill_(-0.5)
    out = q(torch.randn(3, 4))
    assert torch.isfinite(out).all()
    with pytest.raises(CalibrationError, match="positive"):
        lt.export_onnx(q, torch.randn(3, 4), tmp_path / "q.onnx")


@pytest.mark.parametrize("method", ["mse", "percentile", "minmax"])
def test_an_asymmetric_quantizer_calibrates_a_relu_output_on_its_own_grid(method):
    spec = QuantSpec(bits=4, signed=False, symmetric=False)
    q = TensorQuantizer(spec, method=method)
    q.mode = "calibrate"
    q(torch.relu(torch.randn(64, 32, generator=torch.Generator().manual_seed(0))))
    q.load_calibration()
    assert float(q.zero_point) == 0  # no level spent on negatives that never come
    signed = TensorQuantizer(QuantSpec(bits=4), method=method)
    signed.mode = "calibrate"
    signed(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)))
    signed.load_calibration()
    assert float(signed.scale) > 0


def test_mse_weight_ranges_clip_per_channel_and_lower_the_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 256, generator=g)
    errors = {}
    for method in ("minmax", "mse"):
        q = TensorQuantizer(QuantSpec(bits=4, axis=0), method=method)
        q.is_weight = True
        q.calibrate_on(w)
        assert q.mode == "quantize" and q.scale.shape == (8,)
        errors[method] = float(((q(w) - w) ** 2).sum())
        if method == "mse":
            assert torch.all(q.scale * 7 < w.abs().amax(dim=1))  # every Gaussian row's tail is clipped
    assert errors["mse"] < 0.8 * errors["minmax"]


def test_evaluating_restores_the_mode_even_on_error():
    from lowbit.torch.quantizer import evaluating

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    model.train()
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("boom")
    assert all(m.training for m in model.modules())
    model.eval()
    with evaluating(model):
        pass
    assert not any(m.training for m in model.modules())
