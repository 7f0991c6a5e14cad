"""Targets and recipes in the ONNX front end: the qdq target end to end, what each target refuses, recipe files,
glob overrides, and the call before recipes."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lowbit.cli import main
from lowbit.onnx import Budget, Options, placement, quantize
from lowbit.onnx.graph import Graph
from lowbit.onnx.model import preprocess
from lowbit.onnx.settings import QuantizeError, Settings
from lowbit.recipe import Config, LayerConfig, QuantizerConfig, preset, save
from tests.onnx import models

QUIET = Options(compare=False, progress=False)


@pytest.fixture
def files(tmp_path):
    model = models.save(models.convnet(), tmp_path / "convnet.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 16, 16))
    return tmp_path, model, data


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_qdq_plan_puts_a_pair_on_every_input_of_every_quantizable_op_and_none_on_outputs():
    graph = Graph(preprocess(models.convnet()))
    plan = placement.plan(graph, "qdq")
    readers = {t for n in graph.nodes if n.op_type in ("Conv", "Add", "GlobalAveragePool", "Gemm") for t in n.input}
    assert set(plan.activations) == {t for t in readers if graph.is_activation(t)}
    assert "logits" not in plan.activations and plan.biases == {} and plan.constants == set()
    assert set(plan.weights.values()) == {0}  # per output channel
    assert set(plan.quantized_nodes) == {graph.node_name(n) for n in graph.nodes
                                         if n.op_type in ("Conv", "Add", "GlobalAveragePool", "Gemm")}  # fmt: skip
    trt = placement.plan(graph, "trt")
    assert set(trt.activations) < set(plan.activations)  # TensorRT fuses the Add's and the pooling's inputs


def test_qdq_target_end_to_end_is_int8_symmetric_and_keeps_the_outputs(files):
    tmp, model, data = files
    out = tmp / "q.onnx"
    result = quantize(model, out, data, "int8_qdq", options=Options(progress=False))
    q = onnx.load(str(out))
    inits = _inits(q)
    zero_points = [inits[n.input[2]] for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert not any(a.dtype == np.int32 for a in inits.values())  # biases stay float
    x = np.random.default_rng(5).standard_normal((6, 3, 16, 16)).astype(np.float32)
    a, b = _run(model, x).ravel(), _run(out, x).ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
    assert result.target == "qdq" and "laid out for a runtime that fuses Q/DQ itself" in result.table()
    recipe = json.loads(out.with_suffix(".ranges.json").read_text())["recipe"]
    assert recipe["target"] == "qdq" and recipe["rounding"] == "gptq" and recipe["bias_correction"] is True


def test_ort_runs_int8_symmetric_activations_when_the_recipe_asks(files):
    tmp, model, data = files
    act = QuantizerConfig(method="mse")  # signed, symmetric
    config = replace(preset("int8"), default=LayerConfig(act, preset("int8").default.weight))
    quantize(model, tmp / "s8.onnx", data, config, options=QUIET)
    q = onnx.load(str(tmp / "s8.onnx"))
    inits = _inits(q)
    acts = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert acts and all(z.dtype == np.int8 and not z.any() for z in acts)
    assert json.loads((tmp / "s8.ranges.json").read_text())["recipe"]["default"]["input"]["signed"] is True


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (preset("w4a8"), "int8 symmetric weights per channel or per tensor; got 4-bit"),
        (
            Config(LayerConfig(None, QuantizerConfig(bits=2, granularity="group", group_size=128))),
            "weight-only quantization stores int4 or int8 weights",
        ),
        (replace(preset("w8a8_asym"), target="trt"), "target 'trt' takes int8 symmetric activations only"),
        (preset("int8").override("conv1", LayerConfig()), "an override can only keep layers in float"),
        (preset("int8").with_residual_adds(), "residual_adds is for PyTorch models"),
        (replace(preset("int8"), rounding="adaround"), "unknown weight rounding 'adaround' for ONNX models"),
    ],
)
def test_what_the_onnx_front_end_cannot_build_is_named(config, message):
    with pytest.raises(Exception, match=message) as info:
        Settings.of(config)
    assert "lowbit" in type(info.value).__module__


def test_a_float_override_keeps_matching_nodes_in_float_and_one_that_matches_nothing_is_an_error(files):
    tmp, model, data = files
    result = quantize(model, tmp / "f.onnx", data, preset("int8").override("conv*", None), options=QUIET)
    assert {"conv1", "conv2"} <= set(result.excluded_nodes)
    assert not {"conv1", "conv2"} & set(result.quantized_nodes)
    with pytest.raises(placement.ExclusionError, match="override 'nope\\*' matches no node of the model"):
        quantize(model, tmp / "g.onnx", data, preset("int8").override("nope*", None), options=QUIET)
    assert not (tmp / "g.onnx").exists()


def test_the_call_before_recipes_still_works_and_shows_the_new_one(files):
    tmp, model, data = files
    with pytest.warns(DeprecationWarning, match=r"quantize\(model, \.\.\., config, options=Options"):
        old = quantize(model, tmp / "old.onnx", data, target="trt", method="minmax", compare_models=False,
                       progress=False)  # fmt: skip
    new = quantize(model, tmp / "new.onnx", data, preset("int8_trt").with_method("minmax"), options=QUIET)
    assert old.method == new.method == "minmax" and old.target == new.target == "trt"
    assert _inits(onnx.load(str(tmp / "old.onnx"))).keys() == _inits(onnx.load(str(tmp / "new.onnx"))).keys()
    for name, value in _inits(onnx.load(str(tmp / "old.onnx"))).items():
        np.testing.assert_array_equal(value, _inits(onnx.load(str(tmp / "new.onnx")))[name])
    with pytest.raises(TypeError, match="unexpected keyword argument 'methd'"):
        quantize(model, tmp / "x.onnx", data, methd="mse")


def test_a_budget_needs_a_metric_and_a_drop_of_zero_or_more():
    with pytest.raises(QuantizeError, match="max_drop must be 0 or more"):
        Budget(metric=object(), max_drop=-1)
    with pytest.raises(QuantizeError, match="batch_size must be a positive integer"):
        Options(batch_size=0)


def test_cli_config_file_gives_the_same_model_as_the_flags(files, capsys):
    pytest.importorskip("yaml")
    tmp, model, data = files
    recipe = save(replace(preset("int8_trt").with_method("percentile", {"percentile": 99.9}), rounding="nearest"),
                  tmp / "recipe.yaml")  # fmt: skip
    by_file = ["quantize", model, "--calib", data, "--config", str(recipe), "-o", str(tmp / "a.onnx"), "-q",
               "--no-compare"]  # fmt: skip
    by_flags = ["quantize", model, "--calib", data, "--target", "trt", "--method", "percentile", "--option",
                "percentile=99.9", "--rounding", "nearest", "-o", str(tmp / "b.onnx"), "-q",
                "--no-compare"]  # fmt: skip
    assert main(by_file) == 0 and main(by_flags) == 0
    a, b = (json.loads((tmp / f"{n}.ranges.json").read_text()) for n in "ab")
    assert a["activations"] == b["activations"] and a["recipe"] == b["recipe"]
    assert a["recipe"]["default"]["input"]["method_options"] == {"percentile": 99.9}
    # a flag changes what the file says
    assert main([*by_file[:-4], "--target", "ort", "-o", str(tmp / "c.onnx"), "-q", "--no-compare"]) == 0
    assert json.loads((tmp / "c.ranges.json").read_text())["target"] == "ort"
    assert main(["quantize", model, "--calib", data, "--config", "int8_qdq", "-o", str(tmp / "d.onnx"), "-q"]) == 0
    assert "for qdq" in capsys.readouterr().out
    assert (
        main(["quantize", model, "--calib", data, "--config", str(tmp / "none.yaml"), "-o", str(tmp / "e.onnx")]) == 2
    )
    assert "none.yaml: cannot read the recipe" in capsys.readouterr().err
