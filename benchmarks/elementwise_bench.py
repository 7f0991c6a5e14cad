"""What an activation between two quantizers costs in ONNX Runtime, written five ways: the decomposed chain an
exporter writes, the single ONNX op, lowbit's integer form, and a 256-entry table on the codes (Gather).

    python benchmarks/elementwise_bench.py     # about a minute on a 2-core machine

For each activation f, on uint8 codes of shape (8, 64, 56, 56) (a MobileNet stage at batch 8):

- ``chain``: DequantizeLinear -> the exporter's ops (hard-swish ``x * Clip(x + 3, 0, 6) / 6``, GELU's erf form,
  SiLU ``x * Sigmoid(x)``) -> QuantizeLinear;
- ``single op``: DequantizeLinear -> HardSwish / HardSigmoid / Gelu (opset 20) -> QuantizeLinear;
- ``lowbit``: the integer form ``lowbit quantize --target ort`` writes for hard-swish and hard-sigmoid (an Add whose
  output quantizer clips and a Mul, the division folded into a scale; ONNX Runtime fuses them into QLinearAdd and
  QLinearMul);
  SiLU: QLinearSigmoid and QLinearMul, as lowbit places them;
- ``table``: Cast the codes to int32 and Gather from a 256-entry uint8 table, ``table[c] = Q(f(DQ(c)))`` computed
  exactly from f (the codes' lookup a runtime with a table kernel would run).

Latency is the median of 30 runs (``--quick``: 5) after warm-up, each session alone with 2 threads. The table is
exact (it gives the single op's codes); whether it pays is what this measures.

Writes the "elementwise" section of docs/BENCHMARKS.md and docs/benchmarks/elementwise.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_ms, write_section

SHAPE = [8, 64, 56, 56]
S_IN, Z_IN = 0.05, 128  # input codes: x = 0.05 * (c - 128), -6.4 .. 6.35
S_OUT, Z_OUT = 0.03, 20  # output codes


def _c(value, name, dtype=np.float32):
    return numpy_helper.from_array(np.array(value, dtype), name)


def _n(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output], **attrs)


CHAINS = {
    "hard-swish": [_n("Add", ["f", "three"], "a"), _n("Clip", ["a", "zero", "six"], "k"), _n("Mul", ["f", "k"], "m"),
                   _n("Div", ["m", "six"], "g")],
    "hard-sigmoid": [_n("Add", ["f", "three"], "a"), _n("Clip", ["a", "zero", "six"], "k"),
                     _n("Div", ["k", "six"], "g")],
    "GELU (erf)": [_n("Div", ["f", "root2"], "a"), _n("Erf", ["a"], "e"), _n("Add", ["e", "one"], "b"),
                   _n("Mul", ["f", "b"], "m"), _n("Mul", ["m", "half"], "g")],
    "SiLU": [_n("Sigmoid", ["f"], "sg"), _n("Mul", ["f", "sg"], "g")],
}  # fmt: skip
SINGLE = {
    "hard-swish": [_n("HardSwish", ["f"], "g")],
    "hard-sigmoid": [_n("HardSigmoid", ["f"], "g", alpha=1 / 6, beta=0.5)],
    "GELU (erf)": [_n("Gelu", ["f"], "g")],
}
CONSTANTS = [_c(3, "three"), _c(0, "zero"), _c(6, "six"), _c(2**0.5, "root2"), _c(1, "one"), _c(0.5, "half")]


def _model(nodes, inits, opset=20) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "f", [helper.make_tensor_value_info("x", TensorProto.UINT8, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, SHAPE)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _between_quantizers(body) -> onnx.ModelProto:
    inits = [_c(S_IN, "s"), _c(Z_IN, "z", np.uint8), _c(S_OUT, "s2"), _c(Z_OUT, "z2", np.uint8), *CONSTANTS]
    nodes = [_n("DequantizeLinear", ["x", "s", "z"], "f"), *body, _n("QuantizeLinear", ["g", "s2", "z2"], "y")]
    return _model(nodes, inits)


def _integer_form(name: str) -> onnx.ModelProto | None:
    """The nodes ``lowbit quantize --target ort`` writes for hard-swish and hard-sigmoid (tests/onnx/
    test_activations.py checks it does): the Add's output quantizer (zero point 0, scale 6/255) clips at 0 and 6;
    the DequantizeLinear after it reads those codes at scale 1/255 (the division by 6, folded); the Mul takes x."""
    if name == "SiLU":  # Sigmoid and Mul between quantizers: ONNX Runtime's QLinearSigmoid and QLinearMul
        inits = [_c(S_IN, "s"), _c(Z_IN, "z", np.uint8), _c(S_OUT, "s2"), _c(Z_OUT, "z2", np.uint8),
                 _c(1 / 255, "sig_s"), _c(0, "zero_q", np.uint8)]  # fmt: skip
        nodes = [_n("DequantizeLinear", ["x", "s", "z"], "f"), _n("Sigmoid", ["f"], "sg"),
                 _n("QuantizeLinear", ["sg", "sig_s", "zero_q"], "sq"),
                 _n("DequantizeLinear", ["sq", "sig_s", "zero_q"], "sd"),
                 _n("DequantizeLinear", ["x", "s", "z"], "f2"), _n("Mul", ["f2", "sd"], "g"),
                 _n("QuantizeLinear", ["g", "s2", "z2"], "y")]  # fmt: skip
        return _model(nodes, inits)
    if name not in ("hard-swish", "hard-sigmoid"):
        return None
    inits = [_c(S_IN, "s"), _c(Z_IN, "z", np.uint8), _c(S_OUT, "s2"), _c(Z_OUT, "z2", np.uint8),
             _c(255, "three_q", np.uint8), _c(3 / 255, "three_s"), _c(0, "zero_q", np.uint8), _c(6 / 255, "clip_s"),
             _c(1 / 255, "gate_s")]  # fmt: skip
    nodes = [_n("DequantizeLinear", ["x", "s", "z"], "f"),
             _n("DequantizeLinear", ["three_q", "three_s", "zero_q"], "c3"), _n("Add", ["f", "c3"], "a")]  # fmt: skip
    if name == "hard-sigmoid":  # its codes at scale 6/255 are hard-sigmoid's at 1/255: the next op reads them so
        return _model([*nodes, _n("QuantizeLinear", ["a", "clip_s", "zero_q"], "y")], inits)
    nodes += [_n("QuantizeLinear", ["a", "clip_s", "zero_q"], "k"),
              _n("DequantizeLinear", ["k", "gate_s", "zero_q"], "h"),
              _n("DequantizeLinear", ["x", "s", "z"], "f2"), _n("Mul", ["f2", "h"], "g"),
              _n("QuantizeLinear", ["g", "s2", "z2"], "y")]  # fmt: skip
    return _model(nodes, inits)


def _table(name: str) -> onnx.ModelProto:
    codes = np.arange(256, dtype=np.uint8)
    reference = _between_quantizers(SINGLE.get(name, CHAINS[name]))
    sess = ort.InferenceSession(_model_on(reference, codes).SerializeToString(), providers=["CPUExecutionProvider"])
    table = sess.run(None, {"x": codes})[0]
    nodes = [_n("Cast", ["x"], "i", to=TensorProto.INT32), _n("Gather", ["table", "i"], "y", axis=0)]
    return _model(nodes, [numpy_helper.from_array(table.astype(np.uint8), "table")])


def _model_on(model: onnx.ModelProto, codes: np.ndarray) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in [*copy.graph.input, *copy.graph.output]:
        value.type.tensor_type.shape.Clear()
        value.type.tensor_type.shape.dim.add().dim_value = len(codes)
    return copy


RUNS = 30


def _latency_ms(model: onnx.ModelProto, feed: dict) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return median_ms(sess, feed, runs=RUNS, warmup=5)


def run() -> dict:
    codes = {"x": np.random.default_rng(0).integers(0, 256, SHAPE).astype(np.uint8)}
    rows: dict[str, dict[str, float | None]] = {}
    for name in CHAINS:
        integer = _integer_form(name)
        rows[name] = {
            "chain": _latency_ms(_between_quantizers(CHAINS[name]), codes),
            "single op": _latency_ms(_between_quantizers(SINGLE[name]), codes) if name in SINGLE else None,
            "lowbit": None if integer is None else _latency_ms(integer, codes),
            "table": _latency_ms(_table(name), codes),
        }
    return {"machine": machine(), "shape": SHAPE, "runs": RUNS, "rows": rows}


def render(results: dict) -> str:
    from lowbit._table import format_table

    head = ["activation", "chain", "single op", "lowbit (--target ort)", "table (Gather)"]
    rows = []
    for name, r in results["rows"].items():
        cells = ["-" if r.get(k) is None else f"{r[k]:.2f} ms" for k in ("chain", "single op", "lowbit", "table")]
        rows.append([name, *cells])
    m = results["machine"]
    return "\n".join([
        "## Activations between quantizers: chain, single op, integer form, table", "",
        f"`python benchmarks/elementwise_bench.py` ({m['date']}; {m['cpu']}, {m['cores']} cores, ONNX Runtime "
        f"{m['onnxruntime']}). uint8 codes of shape {tuple(results['shape'])} in and out; median of "
        f"{results['runs']} runs. lowbit "
        "writes the integer form for hard-swish and hard-sigmoid, SiLU as QLinearSigmoid + QLinearMul, and GELU as "
        "the single op where the opset has it (20).", "",
        "```", format_table(head, rows, "lrrrr"), "```", "",
    ])  # fmt: skip


def main() -> None:
    import argparse

    global RUNS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 timed runs of each, not 30")
    if parser.parse_args().quick:
        RUNS = 5
    results = run()
    text = render(results)
    write_section("elementwise", text, results)
    print(text)


if __name__ == "__main__":
    main()
