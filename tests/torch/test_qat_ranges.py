"""QAT from a model whose BatchNorm running statistics are not converged: eval-mode calibration must not leave
the activation ranges of training-mode activations clipping everything (issue 23)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.errors import SpecError
from lowbit.torch.fold import folded
from tests.torch import models


def _labels(data, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 4, (len(x),), generator=g) for x in data]


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_qat_from_unconverged_batchnorm_statistics_trains_the_first_layer(seed, learned):
    model, data = models.FreshResNet(seed), models.batches(3, batch=16, seed=seed + 10)
    cfg = lt.preset("w4a4").with_learned_scales() if learned else lt.preset("w4a4")
    q = lt.quantize(model.eval(), cfg, calib=data, qat=True, progress=False).train()
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    before = q.conv1.weight.detach().clone()
    for x, t in zip(data, _labels(data), strict=True):
        opt.zero_grad()
        nn.functional.cross_entropy(q(x), t).backward()
        assert q.conv1.weight.grad.abs().sum() > 0  # the gradient reaches the first layer on every step
        opt.step()
    assert not torch.equal(before, q.conv1.weight.detach())


def test_qat_calibrates_on_batch_statistics_and_leaves_the_running_ones_alone():
    model, data = models.FreshResNet(), models.batches(3, batch=16, seed=10)
    q = lt.quantize(model, "w4a4", calib=data, qat=True, progress=False)
    old = lt.quantize(model, "w4a4", calib=data, qat=True, progress=False, bn_stats="running")
    layers = [m for m in q.modules() if isinstance(m, lt.QuantConvBn2d)]
    assert len(layers) == 3 and not q.training and not any(m.training for m in q.modules())
    for layer in layers:  # still at init: calibration did not move them
        assert torch.equal(layer.bn.running_mean, torch.zeros(8)) and torch.equal(layer.bn.running_var, torch.ones(8))
        assert int(layer.bn.num_batches_tracked) == 0
    # The head's range fits its training-mode input, larger than the eval-mode one (running variance 1 against a
    # batch variance of about 1/3 at the first convolution's output).
    head, head_old = q.fc.input_quantizer, old.fc.input_quantizer
    seen = []
    hook = q.fc.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    q.train()
    with torch.no_grad():
        q(data[0])
    hook.remove()
    hi = float((head.spec.qmax - head.zero_point) * head.scale)
    hi_old = float((head_old.spec.qmax - head_old.zero_point) * head_old.scale)
    assert hi > 1.2 * hi_old
    assert float((seen[0] > hi * (1 + 1 / 30)).float().mean()) < 0.05


def test_batch_statistics_normalises_like_training_and_restores_everything():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    x = models.batches(1, batch=8)[0] * 3 + 1
    expected = nn.functional.batch_norm(model[0](x), None, None, model[1].weight, model[1].bias, training=True)
    with torch.no_grad(), lt.batch_statistics(model):
        assert model[1].training and not model[2].training and not model.training  # Dropout stays off
        got = model(x)
    torch.testing.assert_close(got, expected.detach())
    assert not model[1].training and torch.equal(model[1].running_mean, torch.zeros(4))
    assert int(model[1].num_batches_tracked) == 0


def test_an_unknown_bn_stats_is_a_clear_error():
    with pytest.raises(SpecError, match="bn_stats must be one of"):
        lt.quantize(models.FreshResNet(), "int8", calib=models.batches(1), qat=True, bn_stats="train")


def test_a_quantizer_that_clips_most_of_its_input_in_training_warns_once_naming_itself():
    q = lt.TensorQuantizer(lt.preset("w4a4").default.input.spec(None), name="head.input")
    q(torch.linspace(0, 1, 100))
    q.load_calibration()
    q.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q(torch.linspace(0, 1, 100))  # inside its range: quiet
        assert not caught
        for _ in range(40):
            q(torch.cat([torch.zeros(20), torch.full((80,), 3.0)]))  # 80% above 1: noticed within 16 steps
    assert len(caught) == 1 and issubclass(caught[0].category, lt.ClippingWarning)
    assert "'head.input' clips 80% of its input" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q2 = lt.TensorQuantizer(q.spec)
        q2(torch.linspace(0, 1, 100))
        q2.load_calibration()
        q2.eval()
        q2(torch.linspace(0.5, 3, 100))  # inference: clipping is not checked


def test_qat_on_eval_mode_ranges_of_unconverged_batchnorm_warns_for_the_head():
    model, data = models.FreshResNet(), models.batches(2, batch=16, seed=10)
    q = lt.quantize(model, "w4a4", calib=data, qat=True, progress=False, bn_stats="running").train()
    with pytest.warns(lt.ClippingWarning, match="'fc.input' clips"):
        q(data[0])
    q = lt.quantize(model, "w4a4", calib=data, qat=True, progress=False).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", lt.ClippingWarning)
        for _ in range(3):
            q(data[1])


def _weight_range(quantizer) -> torch.Tensor:
    return (quantizer.scale * (quantizer.spec.qmax - quantizer.zero_point)).detach().clone()


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_in_training_a_weight_range_follows_the_weight_at_its_calibrated_clip(method):
    spec = lt.preset("w4a4").default.weight.spec(0)
    q = lt.TensorQuantizer(spec, method=method, name="fc.weight")
    q.is_weight, q.follow_weight = True, True
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q.calibrate_on(w)
    calibrated = _weight_range(q)
    ratio = calibrated / w.abs().amax(1)
    assert torch.all(ratio <= 1 + 1e-6) and (method == "minmax") == bool(torch.all(ratio > 1 - 1e-6))
    q.train()
    q(w)  # the first step sees the weight calibration saw: the range stays
    torch.testing.assert_close(_weight_range(q), calibrated)
    grown = w * torch.linspace(1, 3, 8)[:, None]  # training (or a BatchNorm's running variance) grew the weight
    with warnings.catch_warnings():
        warnings.simplefilter("error", lt.ClippingWarning)
        q(grown)
    torch.testing.assert_close(_weight_range(q), ratio * grown.abs().amax(1))  # the same clip, on the new weight
    q.eval()
    q(w)  # inference does not move it
    torch.testing.assert_close(_weight_range(q), ratio * grown.abs().amax(1))


def test_qat_weights_that_grow_are_not_clipped_and_keep_learning():
    model, data = models.FreshResNet(0), models.batches(3, batch=16, seed=10)
    q = lt.quantize(model, "w4a4", calib=data, qat=True, progress=False).train()
    layer = q.fc
    with torch.no_grad():
        layer.weight.mul_(3)  # as weights trained from scratch grow
    x = data[0]
    for fixed in (True, False):
        layer.weight_quantizer.follow_weight = not fixed
        layer.zero_grad()
        q(x).square().sum().backward()
        reached = float((layer.weight.grad != 0).float().mean())
        if fixed:  # the range of quantize time: most of the grown weight is clipped, and gets no gradient
            assert reached < 0.5
        else:
            assert reached > 0.95


def _clipped(layer) -> float:
    """The share of a QuantConvBn layer's folded weight outside its weight quantizer's range."""
    q = layer.weight_quantizer
    with torch.no_grad():
        w = layer._weight_to_quantize()
        s = q.scale.reshape(-1, *([1] * (w.dim() - 1)))
        codes = torch.round(w / s) + q.zero_point.reshape(s.shape)
        return float(((codes < q.spec.qmin) | (codes > q.spec.qmax)).float().mean())


def test_qat_weight_ranges_move_with_the_batchnorm_fold_not_with_the_weight():
    model, data = models.FreshResNet(0), models.batches(4, batch=16, seed=10)
    clipped = {}
    for follow in (False, True):
        q = lt.quantize(model, "w4a4", calib=data, qat=True, progress=False)
        layers = [m for m in q.modules() if isinstance(m, lt.QuantConvBn2d)]
        for layer in layers:  # calibrating on batch statistics left each range as calibrated
            torch.testing.assert_close(_weight_range(layer.weight_quantizer), layer._calibration[2])
            layer.follow_bn = follow
        q.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lt.ClippingWarning)
            with torch.no_grad():
                for _ in range(20):  # the running variances settle from 1 towards the real ones: f grows
                    for x in data:
                        q(x)
        clipped[follow] = max(_clipped(layer) for layer in layers)
        if follow:  # the range is the calibrated one times f / f_calibrated, channel by channel
            layer = layers[0]
            layer.bn.momentum = 0.0  # one more step that leaves the running statistics, so f is the one it used
            with torch.no_grad():
                q(data[0])
            f0, _, hi0 = layer._calibration
            f, _ = folded(layer.bn, None)
            expected = hi0 * (f / f0).abs()
            torch.testing.assert_close(_weight_range(layer.weight_quantizer), expected, rtol=1e-4, atol=1e-6)
            assert float((f / f0).abs().min()) > 1.5  # the fold really moved
    assert clipped[False] > 0.5  # a range fixed at quantize time clips most of the folded weight
    assert clipped[True] < 0.01
