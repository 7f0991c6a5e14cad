"""The ``relerr`` budget metric: the relative error of the whole first output to FP32's, which sees the error of a
model whose output is one value per sample (a sigmoid score, where a cosine is always 1)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.onnx import Budget, Options, metrics
from lowbit.onnx.pipeline import quantize
from lowbit.onnx.settings import edit
from lowbit.recipe import preset

PER_TENSOR = edit(preset("int8"), per_channel=False)


def score_head(squeeze: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x (N,16) -> Gemm(16x32) -> Relu -> Gemm(32x1) -> Sigmoid: one score per sample, (N,1), or (N,) with
    ``squeeze``. One input row of the first weight is 40x the rest, so per tensor int8 loses visibly."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 32)) * 0.3).astype(np.float32)
    w1[0] *= 40.0
    w2 = (rng.standard_normal((32, 1)) * 0.3).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.zeros(32, np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.zeros(1, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], "fc1"),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logit"], "fc2"),
        helper.make_node("Sigmoid", ["logit"], ["score"], "sigmoid"),
    ]
    output, shape = "score", ["N", 1]
    if squeeze:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        nodes.append(helper.make_node("Squeeze", ["score", "axes"], ["y"], "squeeze"))
        output, shape = "y", ["N"]
    graph = helper.make_graph(
        nodes,
        "score_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save_score_head(tmp, squeeze: bool = False) -> tuple[str, str, str]:
    """The model, calibration data (48 samples) and evaluation data (32 other samples) in ``tmp``."""
    model = tmp / "score.onnx"
    onnx.save(score_head(squeeze), str(model))
    np.savez(tmp / "calib.npz", x=np.random.default_rng(1).standard_normal((48, 16)).astype(np.float32))
    np.savez(tmp / "eval.npz", x=np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32))
    return str(model), str(tmp / "calib.npz"), str(tmp / "eval.npz")


def _feeds(n=32, seed=2):
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    return [{"x": x[i : i + 16]} for i in range(0, n, 16)]


def _quantize(tmp, squeeze, kind, max_drop):
    model, calib, _ = save_score_head(tmp, squeeze)
    budget = Budget(metrics.OutputMetric(kind, _feeds()), max_drop)
    options = Options(compare=False, progress=False)
    return quantize(model, tmp / "q.onnx", calib, PER_TENSOR, budget=budget, options=options)


class _Fixed:
    """A stand-in session whose first output is ``outputs``, batch after batch."""

    def __init__(self, outputs):
        self.outputs = iter(outputs)

    def get_outputs(self):
        return [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]

    def run(self, names, feed):
        return [next(self.outputs)]


def test_relative_error_is_over_the_whole_output_of_any_shape():
    rng = np.random.default_rng(0)
    for shape in [(8,), (8, 1), (8, 5), (8, 3, 4, 4)]:
        ref = [rng.standard_normal(shape), rng.standard_normal(shape)]
        out = [r + 0.01 * rng.standard_normal(shape) for r in ref]
        whole = np.linalg.norm(np.concatenate(out) - np.concatenate(ref)) / np.linalg.norm(np.concatenate(ref))
        assert metrics.relative_error(ref, out) == pytest.approx(whole)
        assert metrics.relative_error(ref, ref) == 0.0
    # One value per sample: every sample 1% too high is a relative error of 1%, 40 dB of SQNR.
    ref = [np.linspace(0.1, 0.9, 16, dtype=np.float32)]
    assert metrics.relative_error(ref, [ref[0] * 1.01]) == pytest.approx(0.01, rel=1e-4)


def test_a_nonfinite_output_is_the_worst_error_and_a_nonfinite_reference_is_left_out():
    ref = [np.array([[0.2], [0.4], [0.6]], np.float32)]
    for bad in (np.nan, np.inf, -np.inf):
        out = [np.array([[0.2], [bad], [0.6]], np.float32)]
        assert metrics.relative_error(ref, out) == metrics.WORST_RELERR
    assert json.loads(json.dumps(metrics.WORST_RELERR)) == metrics.WORST_RELERR  # finite: it goes into JSON
    nan_ref = [np.array([[0.2], [np.nan], [0.6]], np.float32)]
    assert metrics.relative_error(nan_ref, [np.array([[0.2], [np.nan], [0.6]], np.float32)]) == 0.0
    assert metrics.relative_error(nan_ref, [np.array([[0.2], [5.0], [0.6]], np.float32)]) == 0.0
    zeros = [np.zeros((3, 1), np.float32)]
    assert metrics.relative_error(zeros, zeros) == 0.0
    assert metrics.relative_error(zeros, [np.full((3, 1), 1e-3, np.float32)]) == metrics.WORST_RELERR
    with pytest.raises(ValueError, match="differs from FP32's"):
        metrics.relative_error(ref, [np.zeros((3, 2), np.float32)])


@pytest.mark.parametrize("squeeze", [False, True])
def test_relerr_sees_the_error_of_a_sigmoid_score_where_cosine_cannot(squeeze):
    model = score_head(squeeze)
    fp32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [fp32.run(None, dict(f))[0] for f in _feeds()]
    assert outputs[0].shape == ((16,) if squeeze else (16, 1))
    spoiled = [o * 0.9 for o in outputs]  # every score 10% low: a real error
    cosine, relerr = metrics.OutputMetric("cosine", _feeds()), metrics.OutputMetric("relerr", _feeds())
    assert cosine.prepare(fp32) == pytest.approx(1.0) and relerr.prepare(fp32) == 0.0
    assert cosine.drop(cosine.score(_Fixed(spoiled))) == pytest.approx(0.0, abs=1e-6)  # cosine: no drop at all
    assert relerr.drop(relerr.score(_Fixed(spoiled))) == pytest.approx(0.1, rel=1e-3)
    # A NaN score counts as the worst error, beyond any budget, never as good; a finite number for JSON.
    broken = [o.copy() for o in outputs]
    broken[1][3] = np.nan
    assert relerr.drop(relerr.score(_Fixed(broken))) == metrics.WORST_RELERR


def test_classifier_metrics_refuse_a_score_output_and_point_to_relerr():
    fp32 = ort.InferenceSession(score_head().SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="use --metric relerr"):
        metrics.OutputMetric("agreement", _feeds()).prepare(fp32)
    with pytest.raises(ValueError, match=r"unknown metric 'sqnr'; metrics: cosine, agreement, accuracy, relerr"):
        metrics.OutputMetric("sqnr", _feeds())


@pytest.mark.parametrize("squeeze", [False, True])
def test_a_tight_relerr_budget_keeps_layers_in_float_and_a_loose_one_does_not(tmp_path, squeeze):
    # The cosine metric cannot protect this model: even a budget of 0 is met with nothing kept in float.
    cosine = _quantize(tmp_path, squeeze, "cosine", 0.0)
    assert cosine.mixed.met and cosine.mixed.kept == []
    # int8 per tensor leaves a relative error of about 3% (fc1 alone in float: about 1.2%).
    quantized = cosine.mixed.steps[0]
    tight = _quantize(tmp_path, squeeze, "relerr", 0.02)
    assert tight.mixed.met and tight.mixed.kept == ["fc1"] and "fc1" in tight.excluded_nodes
    first = tight.mixed.steps[0]
    assert tight.mixed.reference == 0.0 and first.drop == -first.score and 0.02 < first.drop < 0.1
    assert quantized.score == pytest.approx(1.0)  # the same fully quantized model, which the cosine calls exact
    assert "mixed precision: relerr FP32 0.0000, budget: drop <= 0.02" in tight.mixed.table()
    loose = _quantize(tmp_path, squeeze, "relerr", 0.1)
    assert loose.mixed.met and loose.mixed.kept == [] and "fc1" not in loose.excluded_nodes
