"""The recipe's weight method in the ONNX front end: chosen once after calibration (Calibrated.scales), the same
scales in GPTQ, bias correction and the built model; int8 weights stay symmetric."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lowbit.cli import main
from lowbit.onnx import Options, rewrite
from lowbit.onnx.calibration import calibrate_model
from lowbit.onnx.pipeline import quantize
from lowbit.onnx.settings import QuantizeError, Settings, edit
from lowbit.recipe import preset
from tests.onnx import models


def _weight_scales(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(scale, zero point) of every DequantizeLinear whose input is an int8 initializer of rank 2 or more."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        x = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and x is not None and x.dtype == np.int8 and x.ndim >= 2:
            out[node.output[0]] = (inits[node.input[1]], inits[node.input[2]])
    return out


def _outputs(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("model_fn, shape", [(models.convnet, (3, 16, 16)), (models.mlp, None)], ids=["conv", "gemm"])
def test_admm_weights_differ_from_max_and_the_model_still_agrees(tmp_path, model_fn, shape):
    float_model = model_fn()
    shape = shape or tuple(d.dim_value for d in float_model.graph.input[0].type.tensor_type.shape.dim[1:])
    path = models.save(float_model, tmp_path / "m.onnx")
    data = models.calib_data(tmp_path / "calib.npz", shape)
    x = np.random.default_rng(3).standard_normal((8, *shape)).astype(np.float32)
    scales = {}
    for method in ("minmax", "admm"):
        out = tmp_path / f"{method}.onnx"
        config = edit(preset("int8"), weight_method=method)
        quantize(path, out, data, config, options=Options(progress=False, compare=False))
        scales[method] = _weight_scales(onnx.load(str(out)))
        a, b = _outputs(path, x).ravel(), _outputs(out, x).ravel()
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
    assert scales["admm"].keys() == scales["minmax"].keys() and scales["admm"]
    moved = 0
    for name, (scale, zero_point) in scales["admm"].items():
        assert not zero_point.any()  # symmetric int8
        moved += int((scale != scales["minmax"][name][0]).sum())
    assert moved > 0


def test_the_scales_chosen_once_are_the_built_models(tmp_path):
    float_model = models.convnet()
    data = models.calib_data(tmp_path / "calib.npz", (3, 16, 16))
    batches = [{"x": b} for b in np.split(np.load(data)["x"], 6)]
    settings = Settings.of(edit(preset("int8"), weight_method="admm"))
    assert settings.weight_method == "admm" and settings.rounding == "gptq" and settings.bias_correction
    calibrated = calibrate_model(float_model, batches, settings, progress=False)
    built = calibrated.build()
    in_model = {n.input[0]: n for n in built.model.graph.node if n.op_type == "DequantizeLinear"}
    inits = {i.name: numpy_helper.to_array(i) for i in built.model.graph.initializer}
    for weight, scale in calibrated.scales.items():
        node = next(n for n in in_model.values() if n.output[0] == weight)
        np.testing.assert_array_equal(inits[node.input[1]], scale)
    graph = calibrated.graph
    w = next(iter(calibrated.scales))
    minmax = rewrite.weight_scale(graph.value(w).astype(np.float32), built.plan.weights[w])
    assert not np.array_equal(calibrated.scales[w], minmax)


def test_unknown_weight_methods_and_options_are_named():
    with pytest.raises(QuantizeError, match="unknown weight method 'entropy'; weight methods: minmax, mse, admm"):
        Settings.of(edit(preset("int8"), weight_method="entropy"))
    bad = preset("int8").with_weight_method("admm", {"start": "median"})
    with pytest.raises(QuantizeError, match="start must be one of max, percentile, got 'median'"):
        Settings.of(bad)
    with pytest.raises(QuantizeError, match="dynamic quantization takes each weight's own max"):
        Settings.of(edit(preset("int8"), dynamic=True, weight_method="admm"))


def test_lowbit_quantize_takes_weight_method_and_records_it(tmp_path, capsys):
    model = models.save(models.convnet(), tmp_path / "convnet.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 16, 16))
    argv = ["quantize", model, "--calib", data, "-o", str(tmp_path / "q.onnx"), "--no-compare"]
    assert main([*argv, "--weight-method", "mse"]) == 0
    recipe = json.loads((tmp_path / "q.ranges.json").read_text())["recipe"]
    assert recipe["default"]["weight"]["method"] == "mse"
    with pytest.raises(SystemExit):
        main([*argv, "--weight-method", "kl"])
    err = capsys.readouterr().err
    assert "--weight-method: invalid choice: 'kl'" in err and "admm" in err
