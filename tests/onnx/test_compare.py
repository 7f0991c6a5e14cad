"""Float vs quantized comparison: agreement over finite outputs only, progress bars, untimed batch sizes."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.data import InputSpec
from lowbit.onnx import compare
from lowbit.onnx.compare import interleaved_latency_ms
from lowbit.onnx.model import session
from lowbit.onnx.pipeline import agreement_summary


def _model(nodes, batch="N") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _pair():
    """y = |x| and y = sqrt(x) * sqrt(x): equal where x >= 0, NaN in the second where an element is negative."""
    reference = _model([helper.make_node("Abs", ["x"], ["y"])])
    candidate = _model(
        [helper.make_node("Sqrt", ["x"], ["s"]), helper.make_node("Mul", ["s", "s"], ["y"])],
    )
    return session(reference), session(candidate)


def _feeds(*rows):
    return [{"x": np.array(rows, np.float32)}]


def test_nan_outputs_are_left_out_of_every_figure():
    ref, cand = _pair()
    # The last row's NaN sits where the reference's argmax is: counted as agreement before, with cosine NaN.
    feeds = _feeds([1, 2, 3, 4], [4, 1, 2, 3], [0.5, 0.25, 2, 1], [-9, 1, 2, 3])
    a = compare.agreement(ref, cand, feeds, progress=False)
    assert (a.samples, a.nonfinite, a.nonfinite_reference, a.finite) == (4, 1, 0, 3)
    assert a.cosine == pytest.approx(1.0) and a.top1 == 1.0
    assert a.max_abs_error < 1e-5


def test_top1_counts_only_finite_samples():
    ref, cand = _pair()
    # Row 2 disagrees (|-1| is the reference's largest, the candidate's NaN); no finite sample disagrees.
    feeds = _feeds([1, 2, 3, 4], [0, -1, 0.5, 0.25], [np.inf, 1, 1, 1], [np.nan, 1, 1, 1])
    a = compare.agreement(ref, cand, feeds, progress=False)
    assert (a.samples, a.nonfinite, a.nonfinite_reference) == (4, 3, 2)
    assert a.top1 == 1.0 and a.cosine == pytest.approx(1.0) and np.isfinite(a.max_abs_error)


def test_no_finite_sample_leaves_no_figure():
    ref, cand = _pair()
    a = compare.agreement(ref, cand, _feeds([-1, 2, 3, 4], [np.nan, 0, 0, 0]), progress=False)
    assert (a.samples, a.nonfinite, a.nonfinite_reference) == (2, 2, 1)
    assert a.cosine is None and a.max_abs_error is None and a.top1 is None
    assert a.to_dict()["nonfinite"] == 2


def test_agreement_shows_a_bar_per_batch(capsys):
    ref, cand = _pair()
    feeds = _feeds([1, 2, 3, 4]) * 3
    compare.agreement(ref, cand, feeds, progress=False)
    assert capsys.readouterr().err == ""
    compare.agreement(ref, cand, feeds)
    err = capsys.readouterr().err
    assert "comparing" in err and "/3 " in err  # the total comes from len(feeds)


def test_latencies_say_why_a_batch_size_was_not_timed(capsys):
    sess = session(_model([helper.make_node("Abs", ["x"], ["y"])], batch=1))
    inputs = (InputSpec("x", np.dtype("float32"), (1, 4)),)
    assert compare.untimed(inputs, (1, 8)) == {8: "the model's batch size is fixed at 1"}
    assert compare.untimed((InputSpec("x", np.dtype("float32"), (None, 4)),), (1, 8)) == {}
    times = compare.latencies({"a": sess}, {"x": np.ones((1, 4), np.float32)}, inputs, (1, 8))
    assert times["a"][8] is None and times["a"][1] > 0
    assert "timing latency" in capsys.readouterr().err


def test_interleaved_latency_runs_every_model_in_each_round_in_rotated_order():
    calls: list[tuple[str, float]] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, outputs, feed):
            calls.append((self.name, time.perf_counter()))

    sessions = {n: Fake(n) for n in "abc"}
    times = interleaved_latency_ms(sessions, {}, warmup=1, settle_s=0.0, runs=2, timed_s=0.0, budget_s=0.0, rounds=3)
    assert set(times) == {"a", "b", "c"} and all(t >= 0 for t in times.values())
    names = [n for n, _ in calls]
    assert names[:3] == ["a", "b", "c"]  # warm-up
    # A block per model and round: one untimed run, then the timed ones; the order rotates each round.
    assert names[3:] == [n for n in "abcbcacab" for _ in range(3)]

    calls.clear()
    interleaved_latency_ms(sessions, {}, warmup=0, settle_s=0.01, runs=1, timed_s=0.0, budget_s=0.0, rounds=2)
    blocks, i = [], 0
    while i < len(calls):  # split the calls into runs of one model
        j = i
        while j < len(calls) and calls[j][0] == calls[i][0]:
            j += 1
        blocks.append(calls[i:j])
        i = j
    assert len(blocks) == 6
    # Each model runs on its own for settle_s before its timed run: other sessions' threads have gone quiet.
    assert all(len(b) >= 2 and b[-1][1] - b[0][1] >= 0.009 for b in blocks)


def _scaled(scale: np.ndarray, channels: int):
    """y = x * scale (per channel of axis 1): a model whose output we choose."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["y"])],
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 10])],
        [numpy_helper.from_array(scale.astype(np.float32).reshape(channels, 1), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return session(model)


def test_a_collapsed_block_of_outputs_shows_though_larger_outputs_hide_it_in_the_whole_cosine():
    boxes_then_scores = np.array([300.0, 300, 300, 300, 1, 1])
    broken = boxes_then_scores * [1, 1, 1, 1, -1, 0.2]  # the two score channels destroyed
    x = np.abs(np.random.default_rng(0).standard_normal((40, 6, 10))).astype(np.float32)
    a = compare.agreement(_scaled(boxes_then_scores, 6), _scaled(broken, 6), [{"x": x}], progress=False)
    assert a.cosine > 0.999  # the box coordinates dominate the whole output
    assert a.worst_channel[0] == 4 and a.worst_channel[1] == pytest.approx(-1.0)
    assert a.channel_cosines[5] == pytest.approx(1.0) and a.collapsed
    line = agreement_summary(a, "held-out")
    assert "worst of the output's 6 channels (axis 1): 4, cosine -1.00000; WARNING: far below" in line
    same = compare.agreement(_scaled(boxes_then_scores, 6), _scaled(boxes_then_scores, 6), [{"x": x}], progress=False)
    assert not same.collapsed and "WARNING" not in agreement_summary(same, "held-out")


def test_one_value_per_sample_has_its_error_in_the_sqnr_and_few_samples_are_called_rough():
    x = np.random.default_rng(1).standard_normal((12, 1, 10)).astype(np.float32)
    a = compare.agreement(_scaled(np.ones(1), 1), _scaled(np.full(1, 1.1), 1), [{"x": x}], progress=False)
    assert a.cosine == pytest.approx(1.0) and a.sqnr_db == pytest.approx(20.0, abs=1e-3)  # 10% off everywhere
    assert a.channel_cosines == ()
    assert "output agreement on 12 held-out samples (only 12 samples: rough figures)" in agreement_summary(
        a, "held-out"
    )
    assert "SQNR 20.0 dB" in agreement_summary(a, "held-out")
