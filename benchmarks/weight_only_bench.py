"""Weight-only INT4/INT8 on all-MiniLM-L6-v2 (``lowbit quantize --weight-only``) beside ONNX Runtime's own
``MatMulNBitsQuantizer`` (its RTN, ``DefaultWeightOnlyQuantConfig``) on the same model and sentences.

    python benchmarks/weight_only_bench.py            # 256 calibration + 512 test sentences (lowbit example minilm)
    python benchmarks/weight_only_bench.py --quick    # 64 + 128 sentences, fewer configurations and timing runs

Writes the "weight-only" section of docs/BENCHMARKS.md and docs/benchmarks/weight-only.json. For each model: the
mean and least cosine of each sentence embedding to FP32's on the test sentences, the file size, and ONNX Runtime's
CPU median latency at batch 1 and batch 8 (the first test sentences, padded to the file's longest). lowbit's rows
are MatMulNBits (``--target ort``) at accuracy_level 0 (float activations) unless the label says otherwise; GPTQ
calibrates on the calibration sentences; RTN needs no data. The word-embedding table (a Gather, 47 MB in float)
stays float in every row: weight-only quantization touches MatMul/Gemm only, as ONNX Runtime's quantizer does by
default.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from lowbit._table import format_table
from lowbit.examples.minilm import write_minilm
from lowbit.onnx import Options, quantize
from lowbit.onnx.compare import interleaved_latency_ms
from lowbit.onnx.model import session
from lowbit.onnx.settings import edit
from lowbit.recipe import preset

# label -> (--weight-only, group size, asymmetric, rounding, act-order, accuracy level)
LOWBIT = {
    "INT4 RTN g32 sym": ("int4", 32, False, "nearest", False, 0),
    "INT4 RTN g32 asym": ("int4", 32, True, "nearest", False, 0),
    "INT4 RTN g128 sym": ("int4", 128, False, "nearest", False, 0),
    "INT4 RTN g128 asym": ("int4", 128, True, "nearest", False, 0),
    "INT4 GPTQ g32 sym": ("int4", 32, False, "gptq", False, 0),
    "INT4 GPTQ g32 asym": ("int4", 32, True, "gptq", False, 0),
    "INT4 GPTQ g128 sym": ("int4", 128, False, "gptq", False, 0),
    "INT4 GPTQ g128 asym": ("int4", 128, True, "gptq", False, 0),
    "INT4 GPTQ g128 sym act-order": ("int4", 128, False, "gptq", True, 0),
    "INT4 RTN g32 sym, accuracy_level 4": ("int4", 32, False, "nearest", False, 4),
    "INT8 RTN g128 sym": ("int8", 128, False, "nearest", False, 0),
    "INT8 GPTQ g128 sym": ("int8", 128, False, "gptq", False, 0),
}
QUICK = ("INT4 RTN g32 sym", "INT4 GPTQ g32 sym", "INT4 RTN g128 asym", "INT4 GPTQ g128 asym", "INT8 RTN g128 sym")
# label -> (block size, symmetric): ONNX Runtime's RTN (DefaultWeightOnlyQuantConfig), accuracy_level unset
ORT_RTN = {"ORT RTN g32 sym": (32, True), "ORT RTN g32 asym": (32, False), "ORT RTN g128 sym": (128, True),
           "ORT RTN g128 asym": (128, False)}  # fmt: skip


def _embed(path: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    sess = session(path)
    return np.concatenate([sess.run(None, {k: v[i : i + 32] for k, v in data.items()})[0]
                           for i in range(0, len(data["input_ids"]), 32)])  # fmt: skip


def _score(ref: np.ndarray, out: np.ndarray) -> dict:
    a, b = ref.astype(np.float64), out.astype(np.float64)
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"cosine": float(c.mean()), "min_cosine": float(c.min())}


def _latencies(paths: dict[str, Path], data: dict[str, np.ndarray], rounds: int) -> dict[str, dict]:
    """Median ms of every model at batch 1 and 8, timed in interleaved rounds (lowbit.onnx.compare): a neighbour's
    load on the shared cores slows every model alike instead of the ones timed at that moment."""
    sessions = {label: session(path) for label, path in paths.items()}
    out: dict[str, dict] = {label: {} for label in paths}
    for b in (1, 8):
        feed = {k: v[:b] for k, v in data.items()}
        times = interleaved_latency_ms(sessions, feed, runs=3, timed_s=0.0, budget_s=0.0, rounds=rounds)
        for label, ms in times.items():
            out[label][f"b{b}_ms"] = ms
    return out


def _lowbit(src: Path, dst: Path, calib: Path, row: tuple) -> dict:
    kind, group, asym, rounding, act_order, level = row
    config = edit(preset("int8"), weight_only=kind, group_size=group, asymmetric=asym or None, rounding=rounding,
                  act_order=act_order or None)  # fmt: skip
    t0 = time.perf_counter()
    result = quantize(src, dst, calib if rounding == "gptq" else None, config,
                      options=Options(compare=False, progress=False, accuracy_level=level))  # fmt: skip
    return {"quantize_s": time.perf_counter() - t0, "gptq_layers": result.rounded_layers,
            "hessian_passes": result.hessian_passes, "peak_hessian_mb": result.peak_hessian_bytes / 2**20}  # fmt: skip


def _ort_rtn(src: Path, dst: Path, block: int, symmetric: bool) -> dict:
    t0 = time.perf_counter()
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric)
    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=block, is_symmetric=symmetric, algo_config=cfg)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)
    return {"quantize_s": time.perf_counter() - t0}


def bench(work: Path, calib_n: int, test_n: int, labels, rounds: int) -> dict:
    paths = write_minilm(work, calib_samples=calib_n, test_samples=test_n)
    src, test = paths["model"], dict(np.load(paths["test"]))
    ref = _embed(src, test)
    rows = {"FP32": {"size_mb": src.stat().st_size / 1e6}}
    paths_by_label = {"FP32": src}
    jobs = [(label, "lowbit", LOWBIT[label]) for label in labels] + [(k, "ort", v) for k, v in ORT_RTN.items()]
    for i, (label, who, row) in enumerate(jobs):
        dst = work / f"q{i}.onnx"
        info = _lowbit(src, dst, paths["calib"], row) if who == "lowbit" else _ort_rtn(src, dst, *row)
        nodes = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(dst), load_external_data=False).graph.node)
        rows[label] = {**info, "matmulnbits": nodes, "size_mb": dst.stat().st_size / 1e6,
                       **_score(ref, _embed(dst, test))}  # fmt: skip
        paths_by_label[label] = dst
        print(label, rows[label])
    for label, times in _latencies(paths_by_label, test, rounds).items():
        rows[label].update(times)
    return {"samples": {"calibration": calib_n, "test": test_n}, "rows": rows,
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}  # fmt: skip


def render(results: dict) -> str:
    s, rows = results["samples"], results["rows"]
    fp = rows["FP32"]
    table = []
    for label, r in rows.items():
        cos = "-" if label == "FP32" else f"{r['cosine']:.5f}"
        least = "-" if label == "FP32" else f"{r['min_cosine']:.4f}"
        speed = [f"{r[f'b{b}_ms']:.2f} ({fp[f'b{b}_ms'] / r[f'b{b}_ms']:.2f}x)" for b in (1, 8)]
        h = f"{r['peak_hessian_mb']:.1f}" if r.get("hessian_passes") else "-"
        table.append([label, cos, least, f"{r['size_mb']:.1f}", *speed, f"{r.get('quantize_s', 0):.1f}", h])
    head = ["model", "mean cosine", "least cosine", "MB", "ms b=1 (vs FP32)", "ms b=8 (vs FP32)", "quantize s",
            "H MiB"]  # fmt: skip
    return "\n".join([
        "## Weight-only INT4/INT8: all-MiniLM-L6-v2", "",
        f"`python benchmarks/weight_only_bench.py` (`--quick`: fewer sentences and rows). Cosine of each sentence "
        f"embedding to FP32's on {s['test']} test sentences of `lowbit example minilm`; GPTQ calibrates on "
        f"{s['calibration']} others. lowbit rows: `lowbit quantize --weight-only ...` written as MatMulNBits "
        f"(accuracy_level 0 unless said); ORT rows: ONNX Runtime {results['onnxruntime']}'s MatMulNBitsQuantizer "
        "with DefaultWeightOnlyQuantConfig (RTN). Latency: ONNX Runtime CPU, median of interleaved rounds "
        "(lowbit.onnx.compare), on a 2-core machine other sessions shared (differences under ~10% are noise). "
        "The 47 MB word-embedding table stays float in every row (weight-only touches MatMul/Gemm), hence files "
        "of 50-60 MB, not 12. H MiB: the most GPTQ second-moment memory held at once.", "",
        format_table(head, table, "lrrrrrrr"),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 + 128 sentences, 5 lowbit rows, fewer timing runs")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/ alone")
    args = parser.parse_args()
    calib_n, test_n, labels, rounds = (64, 128, QUICK, 1) if args.quick else (256, 512, tuple(LOWBIT), 3)
    with tempfile.TemporaryDirectory() as tmp:
        results = bench(Path(tmp), calib_n, test_n, labels, rounds)
    results["machine"] = machine()
    text = render(results)
    print(text)
    if not args.no_write:
        write_section("weight-only", text, results)


if __name__ == "__main__":
    main()
