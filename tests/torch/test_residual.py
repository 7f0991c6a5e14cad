from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lowbit.torch as lt
from lowbit.errors import SpecError
from tests.torch import models

INT8_ADDS = lt.preset("int8").with_residual_adds()


def _adds(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lt.Add)}


def test_tracing_finds_the_residual_additions_and_their_skip_inputs():
    gm = lt.trace_residual_adds(models.ResBlock())
    adds = _adds(gm)
    # conv2(..) + down(x): both from convolutions, the second is the shortcut; out + expand(out): out is the skip.
    assert {n: m.quantize for n, m in adds.items()} == {"add": (False, True), "add_1": (True, False)}
    x = models.batches(1)[0]
    torch.testing.assert_close(gm(x), models.ResBlock()(x))


def test_skip_inputs_are_quantized_and_the_export_matches_onnx_runtime(tmp_path):
    model, data = models.ResBlock().eval(), models.batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "never ran" warning: nothing is left uncalibrated
        q = lt.quantize(model, INT8_ADDS, calib=data, progress=False)
    adds = {n: m for n, m in q.named_modules() if isinstance(m, lt.QuantAdd)}
    assert sorted(adds) == ["add", "add_1"]
    modes = {n: [qz.mode for qz in m.input_quantizers] for n, m in adds.items()}
    assert modes == {"add": ["disabled", "quantize"], "add_1": ["quantize", "disabled"]}
    x = models.batches(1, seed=5)[0]
    path = lt.export_onnx(q, x, tmp_path / "res.onnx")
    proto = onnx.load(path)
    producers = {o: n for n in proto.graph.node for o in n.output}
    dq_into_add = [
        n for n in proto.graph.node if n.op_type == "Add" and any(producers[i].op_type == "DequantizeLinear"
                                                                  for i in n.input if i in producers)
    ]  # fmt: skip
    assert len(dq_into_add) == 2
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, q(x).numpy(), atol=1e-4)


def test_an_override_can_leave_an_add_in_float():
    q = lt.quantize(models.ResBlock(), INT8_ADDS.override("add_1", None), calib=models.batches(), progress=False)
    assert isinstance(q.add_1, lt.Add) and not isinstance(q.add_1, lt.QuantAdd)
    assert isinstance(q.add, lt.QuantAdd)


def test_an_add_written_in_the_model_is_quantized_without_tracing():
    q = lt.quantize(models.ExplicitAdd(), "int8", calib=models.batches(), progress=False)
    assert type(q).__name__ == "ExplicitAdd"
    assert [qz.mode for qz in q.add.input_quantizers] == ["disabled", "quantize"]


def test_without_residual_adds_nothing_is_traced():
    q = lt.quantize(models.ResBlock(), "int8", calib=models.batches(), progress=False)
    assert type(q) is models.ResBlock and not _adds(q)


def test_an_untraceable_model_says_what_to_do():
    with pytest.raises(SpecError, match=r"lowbit\.torch\.Add"):
        lt.quantize(models.Untraceable(), INT8_ADDS, calib=models.batches(), progress=False)


def test_residual_adds_cannot_be_in_place():
    with pytest.raises(SpecError, match="in place"):
        lt.quantize(models.ResBlock(), INT8_ADDS, calib=models.batches(), inplace=True, progress=False)


def test_a_quant_add_of_numbers_switches_its_quantizers_off():
    add = lt.QuantAdd.from_float(lt.Add((True, True)), lt.LayerConfig(), "add")
    assert add(3, 4) == 7
    assert [q.mode for q in add.input_quantizers] == ["disabled", "disabled"]
