"""SmoothQuant for static W8A8 through the ONNX front end: all-MiniLM-L6-v2 with and without it, both targets.

    python benchmarks/smoothquant_bench.py            # 512 test sentences, 256 calibration sentences
    python benchmarks/smoothquant_bench.py --quick    # 128 + 64
    python benchmarks/smoothquant_bench.py --render-only   # the section again from docs/benchmarks/smoothquant.json

`lowbit quantize --target ort|trt` with the front end's defaults (mse ranges, GPTQ, bias correction), without
SmoothQuant, with `--smoothquant 0.5` and with `--smoothquant search`; the cosine of each sentence embedding to
FP32's, file size, quantization time and ONNX Runtime CPU latency at batch 1 and 8 (median of 10 runs; a `--target
trt` layout is for TensorRT, timed here only for completeness). ONNX Runtime's own SmoothQuant (quantize_static
with extra_options SmoothQuant) is a peer row when neural-compressor 2.x's ONNX adaptor imports (3.x has none).
Writes the "smoothquant" section of docs/BENCHMARKS.md and docs/benchmarks/smoothquant.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, machine, median_ms, write_section
from lowbit._table import format_table
from lowbit.examples import WordPiece, minilm_onnx, sentences
from lowbit.onnx import Options, quantize
from lowbit.onnx.model import session
from lowbit.onnx.settings import edit
from lowbit.recipe import preset

ROWS = {  # label -> (target, smoothquant)
    "W8A8 ort": ("ort", None),
    "W8A8 ort + SmoothQuant 0.5": ("ort", 0.5),
    "W8A8 ort + SmoothQuant search": ("ort", "search"),
    "W8A8 trt": ("trt", None),
    "W8A8 trt + SmoothQuant 0.5": ("trt", 0.5),
    "W8A8 trt + SmoothQuant search": ("trt", "search"),
}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _embed(sess, feeds: list[dict]) -> np.ndarray:
    return np.concatenate([sess.run(None, f)[0] for f in feeds])


def _row(sess, ref: np.ndarray, feeds: list[dict], timing: dict[int, dict], path: Path) -> dict:
    c = _cosines(ref, _embed(sess, feeds))
    out = {"cosine": float(c.mean()), "min_cosine": float(c.min()), "size_mb": path.stat().st_size / 1e6}
    for b, feed in timing.items():
        out[f"latency_b{b}_ms"] = median_ms(sess, feed, runs=10, warmup=2)
    return out


def _ort_smoothquant(src: Path, dst: Path, calib: list[dict]) -> str | None:
    """ONNX Runtime's quantize_static with SmoothQuant (alpha 0.5), QDQ, uint8 activations, int8 per-channel
    weights; None when it ran, else why not."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 0.5})  # fmt: skip
    except Exception as exc:  # the peer's failure is a figure to report, not a crash of the benchmark
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return None


def bench(work: Path, count: int, calib_count: int) -> dict:
    src = work / "minilm.onnx"
    onnx.save(minilm_onnx(), str(src))
    tokenizer = WordPiece()
    texts = sentences(count + calib_count)
    texts, calib_texts = texts[:count], texts[count:]
    feeds = [tokenizer(texts[i : i + 32]) for i in range(0, len(texts), 32)]
    calib = [tokenizer(calib_texts[i : i + 8]) for i in range(0, len(calib_texts), 8)]
    timing = {1: tokenizer(texts[:1]), 8: tokenizer(texts[:8])}
    fp32 = session(src)
    ref = _embed(fp32, feeds)
    rows = {"FP32": _row(fp32, ref, feeds, timing, src)}
    for label, (target, alpha) in ROWS.items():
        dst = work / f"q{len(rows)}.onnx"
        t0 = time.perf_counter()
        result = quantize(src, dst, calib, edit(preset("int8"), target=target, smoothquant=alpha),
                          options=Options(compare=False, progress=False))  # fmt: skip
        rows[label] = {"quantize_s": time.perf_counter() - t0, **_row(session(dst), ref, feeds, timing, dst)}
        if result.smoothing is not None:
            rows[label]["smoothing"] = result.smoothing.summary()
        print(label, rows[label], flush=True)
    peer = work / "ort_sq.onnx"
    t0 = time.perf_counter()
    why = _ort_smoothquant(src, peer, calib)
    peer_row = {"failed": why} if why else {"quantize_s": time.perf_counter() - t0,
                                            **_row(session(peer), ref, feeds, timing, peer)}  # fmt: skip
    rows["ORT quantize_static + SmoothQuant 0.5"] = peer_row
    print("ORT SmoothQuant", peer_row, flush=True)
    return {"samples": {"calibration": len(calib_texts), "evaluation": len(texts)}, "rows": rows}


def _cell(row: dict, key: str, spec: str) -> str:
    return "-" if key not in row else format(row[key], spec)


def render(results: dict) -> str:
    s = results["samples"]
    parts = ["## SmoothQuant (static W8A8 on a transformer)", "",
             f"all-MiniLM-L6-v2, `lowbit quantize --target ort|trt [--smoothquant 0.5|search]` with the front end's "
             f"defaults (mse ranges, GPTQ, bias correction): cosine of each sentence embedding to FP32's on "
             f"{s['evaluation']} sentences, calibration on {s['calibration']} others. Latency: ONNX Runtime "
             f"{ort.__version__} CPU, median of 10 runs, on {machine().get('cpu', 'this CPU')}, a shared, loaded "
             "machine where other sessions ran too: rough figures, which swung up to 4x between rows of one layout "
             "(a trt layout is for TensorRT, not for ORT's integer kernels). The alpha search scores W8A8 fake "
             "quantization "
             "(input per tensor at its min/max, weights per output channel) on 512 sampled rows per tensor; "
             "ONNX Runtime's SmoothQuant needs neural-compressor 2.x's ONNX adaptor: the registry's 3.x has none, and "
             "2.6 installed without its dependencies stops at importing cv2.", ""]  # fmt: skip
    table = []
    for k, r in results["rows"].items():
        if "failed" in r:
            table.append([k, "did not run", "-", "-", "-", "-", "-"])
            continue
        table.append([k, "-" if k == "FP32" else f"{r['cosine']:.5f}", "-" if k == "FP32" else f"{r['min_cosine']:.4f}",
                      _cell(r, "latency_b1_ms", ".1f"), _cell(r, "latency_b8_ms", ".1f"), f"{r['size_mb']:.1f}",
                      _cell(r, "quantize_s", ".0f")])  # fmt: skip
    headers = ["model", "mean cosine", "least cosine", "ms b=1", "ms b=8", "MB", "quantize s"]
    parts += ["```", format_table(headers, table), "```"]
    notes = [f"- {k}: {r['smoothing']}" for k, r in results["rows"].items() if "smoothing" in r]
    notes += [f"- {k}: did not run ({r['failed']})" for k, r in results["rows"].items() if "failed" in r]
    return "\n".join([*parts, "", *notes, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 test and 64 calibration sentences")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/ alone")
    parser.add_argument("--render-only", action="store_true", help="rewrite the section from the last JSON")
    args = parser.parse_args()
    count, calib_count = (128, 64) if args.quick else (512, 256)
    if args.render_only:
        results = json.loads((DOCS / "benchmarks" / "smoothquant.json").read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = bench(Path(tmp), count, calib_count)
        results["machine"] = machine()
    text = render(results)
    print(text)
    if not args.no_write:
        write_section("smoothquant", text, results)


if __name__ == "__main__":
    main()
