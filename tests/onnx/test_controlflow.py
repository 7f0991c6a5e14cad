"""Compute inside If, Loop and Scan bodies: calibrated where it runs, quantized with the main graph's rules, written
as a model that passes onnx.checker and runs in ONNX Runtime with integer kernels inside the bodies."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lowbit.data import open_feeds
from lowbit.data.feeds import InputSpec
from lowbit.onnx import Options, controlflow, quantize
from lowbit.onnx.graph import subgraphs
from lowbit.onnx.model import input_specs
from tests.onnx import controlflow_models as cm

QUIET = Options(compare=False, progress=False)


def _feeds(kind: str, n: int, seed: int, wide: bool | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "if":
        return {"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32), "wide": np.array(wide)}
    if kind == "loop":
        return {"x": rng.standard_normal((n, 16)).astype(np.float32)}
    return {"seq": rng.standard_normal((n, 5, 8)).astype(np.float32)}


def _relative_error(src, dst, feed) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    a = ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    b = ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _kernels(path) -> dict[str, list[str]]:
    """The op types ONNX Runtime runs after its optimizations, by graph: "main" and each body's attribute name."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path) + ".opt.onnx"
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    found: dict[str, list[str]] = {}

    def visit(graph, name):
        found[name] = [n.op_type for n in graph.node]
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g, attr.name)

    visit(onnx.load(str(path) + ".opt.onnx").graph, "main")
    return found


def _quantized(tmp_path, kind, model, calib):
    src = tmp_path / f"{kind}.onnx"
    onnx.save(model, str(src))
    result = quantize(src, tmp_path / f"{kind}_q.onnx", calib, "int8", options=QUIET)
    written = onnx.load(str(tmp_path / f"{kind}_q.onnx"))
    onnx.checker.check_model(written, full_check=True)
    return src, tmp_path / f"{kind}_q.onnx", result


def test_both_branches_of_an_if_are_calibrated_where_they_ran_and_run_integer(tmp_path):
    calib = [_feeds("if", 8, seed, wide=seed % 2 == 0) for seed in range(8)]
    src, dst, result = _quantized(tmp_path, "if", cm.if_model(), calib)
    assert result.layers == 3 and not result.warnings
    assert {"then_conv1", "then_conv2", "else_conv"} <= set(result.quantized_nodes)
    kernels = _kernels(dst)
    assert kernels["then_branch"].count("QLinearConv") == 2 and kernels["else_branch"].count("QLinearConv") == 1
    assert "Conv" not in kernels["then_branch"] + kernels["else_branch"]
    for wide in (True, False):
        assert _relative_error(src, dst, _feeds("if", 16, 99, wide)) < 0.03


def test_a_branch_calibration_never_took_stays_in_float_and_is_named(tmp_path):
    calib = [_feeds("if", 8, seed, wide=True) for seed in range(4)]
    src, dst, result = _quantized(tmp_path, "if", cm.if_model(), calib)
    assert result.layers == 2
    assert any("branch/else_branch never ran" in w for w in result.warnings)
    kernels = _kernels(dst)
    assert "Conv" in kernels["else_branch"] and "QLinearConv" in kernels["then_branch"]
    assert _relative_error(src, dst, _feeds("if", 16, 99, False)) < 1e-5  # the float branch is unchanged


def test_a_loop_body_matmul_is_integer_and_the_output_close(tmp_path):
    src, dst, result = _quantized(tmp_path, "loop", cm.loop_model(), [_feeds("loop", 8, s) for s in range(8)])
    assert "loop_matmul" in result.quantized_nodes
    body = _kernels(dst)["body"]
    assert "MatMulIntegerToFloat" in body and "MatMul" not in body
    assert _relative_error(src, dst, _feeds("loop", 16, 99)) < 0.03


def test_a_scan_body_matmul_is_integer_and_the_output_close(tmp_path):
    src, dst, result = _quantized(tmp_path, "scan", cm.scan_model(), [_feeds("scan", 8, s) for s in range(8)])
    assert "scan_input_matmul" in result.quantized_nodes
    assert "QLinearMatMul" in _kernels(dst)["body"]
    assert _relative_error(src, dst, _feeds("scan", 16, 99)) < 0.03


def test_exposed_body_tensors_hold_what_the_body_computed():
    model = cm.loop_model()
    exposed, names = controlflow.expose(model, ["hw", "h"])
    x = _feeds("loop", 4, 0)["x"]
    out = dict(
        zip(
            [o.name for o in exposed.graph.output],
            ort.InferenceSession(exposed.SerializeToString()).run(None, {"x": x}),
            strict=True,
        )
    )
    w = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    b = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b"))
    h, steps = x, []
    for _ in range(3):
        steps.append(h)
        h = np.maximum(h @ w + b + x, 0)
    np.testing.assert_allclose(out[names["h"]], np.stack(steps), rtol=1e-5, atol=1e-5)  # every iteration, stacked
    np.testing.assert_allclose(out[names["hw"]], np.stack([s @ w for s in steps]), rtol=1e-5, atol=1e-5)


def test_an_if_hands_out_an_empty_tensor_for_the_branch_that_did_not_run():
    exposed, names = controlflow.expose(cm.if_model(), ["tr", "ea"])
    sess = ort.InferenceSession(exposed.SerializeToString())
    outputs = [o.name for o in exposed.graph.output]
    feed = _feeds("if", 2, 0, wide=True)
    got = dict(zip(outputs, sess.run(None, feed), strict=True))
    assert got[names["tr"]].shape == (2, 8, 8, 8) and got[names["ea"]].size == 0


def test_weights_a_body_reads_become_its_own():
    model = cm.if_model()
    assert controlflow.localize(model) == 5
    assert [t.name for t in model.graph.initializer] == []  # nothing in the main graph reads them any more
    then = next(b.graph for b in controlflow.bodies(model.graph) if b.attribute == "then_branch")
    assert {t.name for t in then.initializer} == {"wa_1", "ba_1", "wb_1"}
    onnx.checker.check_model(model, full_check=True)


def test_excluding_the_if_keeps_its_branches_in_float(tmp_path):
    calib = [_feeds("if", 8, seed, wide=seed % 2 == 0) for seed in range(4)]
    onnx.save(cm.if_model(), str(tmp_path / "if.onnx"))
    with pytest.raises(Exception, match="nothing to quantize"):
        quantize(tmp_path / "if.onnx", tmp_path / "q.onnx", calib, "int8", options=QUIET, exclude=["choose"])


def test_a_scalar_input_keeps_its_value_per_chunk_and_a_batch_never_mixes_two(tmp_path):
    chunks = [{"x": np.full((3, 3, 8, 8), i, np.float32), "wide": np.array(i < 2)} for i in range(4)]
    inputs = tuple(InputSpec(*s) for s in input_specs(cm.if_model()))
    source = open_feeds(chunks, inputs)
    batches = list(source.batches(4))
    for batch in batches:
        assert batch["wide"].ndim == 0
        assert set(np.unique(batch["x"])) <= ({0.0, 1.0} if batch["wide"] else {2.0, 3.0})
    assert sum(len(b["x"]) for b in batches) == 12


def test_a_scalar_in_a_npz_holds_for_every_sample(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x, wide=np.array(False))
    inputs = tuple(InputSpec(*s) for s in input_specs(cm.if_model()))
    batches = list(open_feeds(tmp_path / "calib.npz", inputs).batches(4))
    assert [len(b["x"]) for b in batches] == [4, 4, 2] and all(b["wide"].ndim == 0 and not b["wide"] for b in batches)


def test_subgraphs_helper_sees_every_body():
    assert sum(1 for n in cm.if_model().graph.node for _ in subgraphs(n)) == 2


def test_a_recurrent_state_with_its_own_batch_axis_goes_whole_with_each_chunk():
    inputs = (InputSpec("x", np.dtype(np.float32), (None, 4)), InputSpec("state", np.dtype(np.float32), (2, None, 3)),
              InputSpec("sr", np.dtype(np.int64), ()))  # fmt: skip
    chunks = [{"x": np.full((1, 4), i, np.float32), "state": np.full((2, 1, 3), i, np.float32),
               "sr": np.array(16000)} for i in range(5)]  # fmt: skip
    batches = list(open_feeds(chunks, inputs).batches(8))
    assert len(batches) == 5  # one batch per chunk: the state's batch axis is its second
    for i, batch in enumerate(batches):
        assert batch["x"].shape == (1, 4) and batch["state"].shape == (2, 1, 3) and (batch["state"] == i).all()


def test_exclusions_reach_nodes_inside_bodies(tmp_path):
    calib = [_feeds("if", 8, seed, wide=seed % 2 == 0) for seed in range(4)]
    onnx.save(cm.if_model(), str(tmp_path / "if.onnx"))
    result = quantize(tmp_path / "if.onnx", tmp_path / "q.onnx", calib, "int8", options=QUIET, exclude=["^then_conv2$"])
    assert "then_conv2" in result.excluded_nodes and "then_conv1" in result.quantized_nodes
    kernels = _kernels(tmp_path / "q.onnx")
    assert "Conv" in kernels["then_branch"] and kernels["else_branch"].count("QLinearConv") == 1


def test_mixed_precision_ranks_and_keeps_layers_inside_bodies(tmp_path):
    from lowbit.data import open_feeds
    from lowbit.onnx import Budget
    from lowbit.onnx.metrics import OutputMetric

    calib = [_feeds("if", 8, seed, wide=seed % 2 == 0) for seed in range(4)]
    onnx.save(cm.if_model(), str(tmp_path / "if.onnx"))
    inputs = tuple(InputSpec(*s) for s in input_specs(cm.if_model()))
    evaluation = open_feeds([_feeds("if", 8, 50 + s, wide=s % 2 == 0) for s in range(2)], inputs)
    budget = Budget(OutputMetric("relerr", evaluation.batches(8)), 0.0)  # nothing but FP32 meets it
    result = quantize(tmp_path / "if.onnx", tmp_path / "q.onnx", calib, "int8", options=QUIET, budget=budget)
    assert set(result.mixed.kept) == {"then_conv1", "then_conv2", "else_conv"}
    kernels = _kernels(tmp_path / "q.onnx")
    assert "QLinearConv" not in kernels["then_branch"] + kernels["else_branch"]


def test_the_ranges_file_and_the_trt_cache_name_tensors_inside_bodies(tmp_path):
    import json

    calib = [_feeds("if", 8, seed, wide=seed % 2 == 0) for seed in range(4)]
    onnx.save(cm.if_model(), str(tmp_path / "if.onnx"))
    options = Options(compare=False, progress=False, trt_cache=tmp_path / "if.cache")
    quantize(tmp_path / "if.onnx", tmp_path / "q.onnx", calib, "int8", options=options)
    record = json.loads((tmp_path / "q.ranges.json").read_text())
    assert {"tr", "eout"} <= set(record["activations"]) and "wa_1" in record["weights"]
    cache = (tmp_path / "if.cache").read_text()
    assert "\ntr: " in cache and "\neout: " in cache


def test_a_body_that_reuses_a_tensor_name_stays_in_float_and_says_so(tmp_path):
    model = cm.if_model()
    then = next(b.graph for b in controlflow.bodies(model.graph) if b.attribute == "then_branch")
    for node in then.node:  # the then branch's first Conv now computes a name the main graph also computes
        node.input[:] = ["g" if t == "ta" else t for t in node.input]
        node.output[:] = ["g" if t == "ta" else t for t in node.output]
    onnx.save(model, str(tmp_path / "if.onnx"))
    calib = [_feeds("if", 8, seed, wide=seed % 2 == 0) for seed in range(4)]
    result = quantize(tmp_path / "if.onnx", tmp_path / "q.onnx", calib, "int8", options=QUIET)
    assert any("reuse" in w or "names a tensor" in w for w in result.warnings)
    assert "then_conv1" not in result.quantized_nodes and "else_conv" in result.quantized_nodes
