"""Calibration of a model whose inputs fix the batch at 1: a copy with the batch freed, checked by one run."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.onnx.calibration import calibrate_model, calibrator_options
from lowbit.onnx.model import free_batch, input_specs, preprocess, session
from lowbit.onnx.settings import Settings
from lowbit.recipe import preset
from tests.onnx import models


def _fix_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the first dimension of its inputs and outputs fixed at 1, shapes inferred again."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for info in [*out.graph.input, *out.graph.output]:
        info.type.tensor_type.shape.dim[0].dim_value = 1
    del out.graph.value_info[:]
    return preprocess(out)


def _batch_dims(model: onnx.ModelProto) -> list:
    return [spec[2][0] for spec in input_specs(model)]


def test_a_fixed_batch_is_freed_and_gives_the_same_samples():
    fixed = _fix_batch(models.convnet())
    freed = free_batch(fixed, 8)
    assert freed is not None and _batch_dims(fixed) == [1] and _batch_dims(freed) == [None]
    assert freed.graph.output[0].type.tensor_type.shape.dim[0].dim_param
    x = np.random.default_rng(5).standard_normal((8, 3, 16, 16)).astype(np.float32)
    (batched,) = session(freed).run(None, {"x": x})
    alone = np.concatenate([session(fixed).run(None, {"x": x[i : i + 1]})[0] for i in range(8)])
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-5)


def _one_layer(tail_nodes, tail_inits, out_shape):
    """x (1, 4) -> Gemm -> ``tail_nodes`` -> y."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], "fc", transB=1), *tail_nodes]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [w, *tail_inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return preprocess(model)


def test_a_reshape_to_a_constant_batch_of_1_keeps_the_batch_fixed():
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    model = _one_layer([helper.make_node("Reshape", ["h", "shape"], ["y"])], [shape], [1, 3])
    assert free_batch(model, 8) is None


def test_a_graph_that_mixes_samples_keeps_the_batch_fixed():
    """y = h - mean over the batch: runs at batch 8 with the right shape, but each sample's output changes."""
    nodes = [
        helper.make_node("ReduceMean", ["h"], ["m"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["h", "m"], ["y"]),
    ]
    assert free_batch(_one_layer(nodes, [], [1, 3]), 8) is None


def test_a_free_batch_is_left_alone():
    assert free_batch(preprocess(models.convnet()), 8) is None


def test_calibrating_the_freed_copy_gives_the_ranges_of_batch_1_and_builds_the_fixed_model():
    fixed = _fix_batch(models.convnet())
    x = np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32)
    config = replace(preset("int8").with_method("minmax"), rounding="nearest", bias_correction=False)
    one = calibrate_model(fixed, [{"x": x[i : i + 1]} for i in range(16)], config, progress=False)
    eight = calibrate_model(fixed, [{"x": x[:8]}, {"x": x[8:]}], config, run_model=free_batch(fixed, 8), progress=False)
    assert eight.batches == 2
    tensors = list(one.calibrators)
    for t, (lo, hi) in one.ranges(tensors).items():
        assert eight.ranges([t])[t] == (lo, hi)
    assert _batch_dims(eight.build().model) == [1]


def test_entropy_for_onnx_takes_nvidias_zero_bin_unless_told_otherwise():
    def options(method, target, given=None):
        return calibrator_options(Settings.of(preset(f"int8_{target}").with_method(method, given)))

    assert "exclude_zeros" not in options("entropy", "ort")  # NVIDIA's zero bin needs no help
    assert options("entropy", "trt", {"exclude_zeros": True})["exclude_zeros"] is True
    assert "exclude_zeros" not in options("mse", "ort")
