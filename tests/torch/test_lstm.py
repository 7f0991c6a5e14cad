from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.errors import SpecError
from lowbit.torch.layers import QuantLSTM
from tests.torch import models


def _disabled(model):
    for q in lt.quantizers(model).values():
        q.mode = "disabled"
    return model


@pytest.mark.parametrize("kwargs", [{}, {"batch_first": True, "num_layers": 2, "bidirectional": True}])
def test_quant_lstm_with_quantizers_off_is_the_lstm(kwargs):
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 8, **kwargs).eval()
    q = _disabled(QuantLSTM.from_float(lstm, lt.LayerConfig(), "lstm"))
    x = torch.randn(5, 3, 6)  # (batch, seq) when batch_first, else (seq, batch)
    h0 = torch.randn(lstm.num_layers * (2 if lstm.bidirectional else 1), 5 if kwargs else 3, 8)
    for args in ((x,), (x, (h0, h0 * 0.5)), (x[0],)):
        ref, got = lstm(*args), q(*args)
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[1][0], ref[1][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[1][1], ref[1][1], atol=1e-5, rtol=1e-4)


def test_int8_dynamic_quantizes_lstm_and_linear_without_data():
    model = models.Tagger().eval()
    q = lt.quantize(model, "int8_dynamic")
    assert isinstance(q.lstm, QuantLSTM) and isinstance(q.fc, lt.QuantLinear)
    assert sorted(q.lstm.weight_quantizers) == sorted(n for n, _ in model.lstm.named_parameters() if "weight" in n)
    assert q.lstm.input_quantizer.dynamic and q.lstm.hidden_quantizer.dynamic
    w = q.lstm.weight_quantizers["weight_hh_l1_reverse"]
    assert w.scale.shape == (4 * 16,)  # per output row (gate channel)
    x = torch.randn(4, 7, 12)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert not torch.equal(ref, out)
    cosine = nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0)
    assert cosine > 0.999


def test_static_lstm_calibrates_its_input_and_hidden_ranges():
    model = models.Tagger().eval()
    data = [torch.randn(4, 7, 12) for _ in range(3)]
    q = lt.quantize(model, "int8", calib=data, progress=False)
    assert q.lstm.input_quantizer.calibrated and q.lstm.hidden_quantizer.calibrated
    assert float(q.lstm.hidden_quantizer.scale) <= 1 / 127 + 1e-6  # |h| < 1
    x = torch.randn(4, 7, 12)
    with torch.no_grad():
        cosine = nn.functional.cosine_similarity(model(x).flatten(), q(x).flatten(), dim=0)
    assert cosine > 0.995


def test_lstm_with_projections_says_so():
    model = nn.Sequential(nn.LSTM(4, 8, proj_size=3))
    with pytest.raises(SpecError, match="proj_size"):
        lt.quantize(model, "int8_dynamic")
