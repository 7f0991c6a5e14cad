"""lowbit inspect: what each kernel ONNX Runtime ran does (integer or float arithmetic, a conversion, a move)."""

from __future__ import annotations

import onnx
import pytest

from lowbit.onnx import Options, kernels
from lowbit.onnx.pipeline import quantize
from tests.onnx import models
from tests.onnx.test_analyze import _feeds


def _event(node, op, types, dur=10):
    return {"cat": "Node", "name": f"{node}_kernel_time", "dur": dur,
            "args": {"op_name": op, "input_type_shape": [{t: [1]} for t in types]}}  # fmt: skip


@pytest.mark.parametrize(
    ("op", "types", "kind"),
    [
        ("Flatten", ["uint8"], "move"),
        ("Transpose", ["uint8"], "move"),
        ("Reshape", ["uint8", "int64"], "move"),
        ("Concat", ["int8", "int8"], "move"),
        ("ReorderOutput", ["float"], "move"),
        ("Flatten", ["float"], "move"),
        ("QLinearConv", ["uint8", "float", "uint8", "float", "int8", "float", "uint8", "int32"], "integer"),
        ("MaxPool", ["uint8"], "integer"),  # a max is arithmetic on the integers
        ("Conv", ["float", "float", "float"], "float"),
        ("DequantizeLinear", ["uint8", "float", "uint8"], "convert"),
        ("Mul", ["int64", "int64"], "other"),  # shape arithmetic is neither integer (8-bit) nor float work
    ],
)
def test_each_kernel_is_told_by_what_it_does(op, types, kind):
    assert kernels.parse([_event("n", op, types)], runs=1, batch=1).kernels[0].kind == kind


def test_the_summary_counts_data_movement_apart():
    p = kernels.parse([_event("conv", "QLinearConv", ["uint8"], 30), _event("flat", "Flatten", ["uint8"], 10)], 1, 1)
    assert p.total_ms("integer") == pytest.approx(0.03) and p.total_ms("move") == pytest.approx(0.01)
    assert "integer 0.030 ms (75%)" in p.summary() and "move 0.010 ms (25%)" in p.summary()


def test_a_loop_body_kernel_counts_every_iteration_and_the_loop_itself_is_left_out():
    # 2 runs (1 warm-up), 3 iterations each: the body kernel ran 6 times; the Loop node's own time holds them
    events = [_event("loop", "Loop", ["float"], 1000)] + [_event("mm", "MatMulIntegerToFloat", ["uint8"], d)
                                                          for d in (1, 1, 1, 10, 20, 30)]  # fmt: skip
    p = kernels.parse(events, runs=1, batch=1, total_runs=2)
    assert [k.node for k in p.kernels] == ["mm"] and p.kernels[0].ms == pytest.approx(0.06)


def test_a_quantized_convnet_moves_bytes_in_its_flatten_and_layout_transpose(tmp_path):
    model = models.save(models.convnet(), tmp_path / "convnet.onnx")
    data = models.calib_data(tmp_path / "calib.npz", (3, 16, 16))
    quantize(model, tmp_path / "q.onnx", data, "int8", options=Options(compare=False, progress=False))
    p = kernels.profile(str(tmp_path / "q.onnx"), _feeds(8)[0], runs=2)
    kinds = {k.op: k.kind for k in p.kernels}
    assert kinds["Flatten"] == "move" and kinds["QLinearConv"] == "integer"
    assert all(k.kind != "integer" for k in p.kernels if k.op in kernels.MOVE)


def test_inspect_takes_free_sizes_from_the_models_metadata(tmp_path, capsys):
    from lowbit.cli import main

    model = models.convnet()
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.ClearField("dim_value")
        d.dim_param = "size"
    path = models.save(model, tmp_path / "free.onnx")
    assert main(["inspect", path, "--runs", "1"]) == 2
    assert "free dimensions besides the batch" in capsys.readouterr().err
    onnx.helper.set_model_props(model, {"imgsz": "[16, 16]"})
    path = models.save(model, tmp_path / "sized.onnx")
    assert main(["inspect", path, "--runs", "1"]) == 0
    assert "random inputs: x [1, 3, 16, 16]; free sizes from the model's metadata: 16x16" in capsys.readouterr().out


@pytest.mark.parametrize(("value", "size"), [("[640, 640]", (640, 640)), ("320", (320, 320)), ("(48, 320)", (48, 320)),
                                             ("[]", None), ("a, b, c", None)])  # fmt: skip
def test_metadata_sizes_are_read_from_the_usual_keys(value, size):
    from lowbit.onnx.model import metadata_size

    model = models.convnet()
    onnx.helper.set_model_props(model, {"image_size": value})
    assert metadata_size(model) == size
