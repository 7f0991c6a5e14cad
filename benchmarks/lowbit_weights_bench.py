"""Number formats: binary, ternary, 2-bit, 4-bit uniform and 4-bit logarithmic weights (int8 activations) on the
Fashion-MNIST models, PTQ and QAT, each exported to ONNX and scored in ONNX Runtime (issue 27).

    apt-get install dataset-fashion-mnist && pip install torch==2.13.0
    python benchmarks/lowbit_weights_bench.py                 # FashionCNN, 1 QAT epoch per row
    python benchmarks/lowbit_weights_bench.py --models cnn mobilenet --epochs 2
    python benchmarks/lowbit_weights_bench.py --models mobilenet --epochs 0.5   # the other model's rows are kept
    python benchmarks/lowbit_weights_bench.py --quick         # 0.05 epoch, 1,000 test images: a smoke run

Writes the "lowbit-weights" section of docs/BENCHMARKS.md and docs/benchmarks/lowbit-weights.json (not --quick).
QAT: lt.quantize(model, preset, calib=1,000 training images, qat=True) (BatchNorm kept training), learned scales
(LSQ) where the format has a calibrated scale (int, log2; binary and ternary recompute theirs from the weight), then
SGD with Nesterov momentum, cosine learning rate from 0.01, half the loss distilled from the FP32 model
(benchmarks/train_fashion.py's train). Weight bytes: lt.packed_weight_bytes (codes at their packed bits, float32
scales, float biases); the ONNX file stores codes one per byte (int8), but INT4 for the 4-bit uniform rows (opset
21) and INT2 for the 2-bit uniform rows (opset 25).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit.torch as lt
from _common import DOCS, machine, write_section
from lowbit._table import format_table
from lowbit.core import QuantSpec, qparams
from lowbit.core.formats.log2 import log2_codes, table
from lowbit.examples import fashion_mnist
from torch_models import pretrained_fashion
from train_fashion import evaluate, train

NARROW_W2 = replace(lt.preset("w2a8"), default=replace(lt.preset("w2a8").default, weight=replace(
    lt.preset("w2a8").default.weight, narrow_range=True)))  # fmt: skip
PTQ = {"W8A8": "int8", "W4A8": "w4a8", "W4A8 log2": "w4a8_log2", "W2A8": "w2a8"}
QAT = {
    "W4A8": "w4a8",
    "W4A8 log2": "w4a8_log2",
    "W2A8 (codes -2..1)": "w2a8",
    "W2A8 narrow (codes -1..1)": NARROW_W2,
    "ternary (TWN)": "ternary_a8",
    "binary (XNOR)": "w1a8",
}


def onnx_top1(model, example, x, y, path: Path, opset: int) -> tuple[float, int]:
    lt.export_onnx(model, example, path, opset=opset)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, {"input": x[i : i + 1000]})[0] for i in range(0, len(x), 1000)])
    return float((out.argmax(1) == y).mean()), path.stat().st_size


def log2_rounding_error(model) -> dict[str, float]:
    """Relative squared error of every Conv/Linear weight at 4-bit log2, per channel, linear vs log rounding."""
    out = {}
    for domain in ("linear", "log"):
        err = tot = 0.0
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                w = m.weight.detach().numpy()
                spec = QuantSpec(bits=4, format="log2", axis=0)
                flat = w.reshape(len(w), -1)
                s, _ = qparams(flat.min(1), flat.max(1), spec)
                q = table(4)[log2_codes(w, s, spec, domain).astype(np.int64) + 7] * s.reshape(-1, *[1] * (w.ndim - 1))
                err += float(((w - q) ** 2).sum())
                tot += float((w**2).sum())
        out[domain] = err / tot
    return out


def bench(name: str, work: Path, epochs: float, test_images: int) -> dict:
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    x_test, y_test = x_test[:test_images], y_test[:test_images]
    pick = np.random.default_rng(0).choice(len(x_train), 1000, replace=False)
    calib = [torch.from_numpy(x_train[pick[i : i + 100]]) for i in range(0, 1000, 100)]
    example = calib[0][:8]
    model = pretrained_fashion(name)
    rows = {"FP32": {"method": "-", "top1": evaluate(model, x_test, y_test),
                     "bytes": 4 * sum(p.numel() for p in model.parameters())}}  # fmt: skip
    print(name, "FP32", rows["FP32"], flush=True)

    def record(label, method, q, seconds):
        row = {"method": method, "top1": evaluate(q, x_test, y_test), "bytes": lt.packed_weight_bytes(q)["total"]}
        opset = 21 if "W4A8" in label and "log2" not in label else 25 if label.startswith("W2A8") else 17
        row["onnx_top1"], row["onnx_bytes"] = onnx_top1(q, example, x_test, y_test, work / f"{name}.onnx", opset)
        row["seconds"] = seconds
        rows[f"{label} {method}"] = row
        print(name, label, method, row, flush=True)

    for label, cfg in PTQ.items():
        t0 = time.perf_counter()
        q = lt.quantize(model, cfg, calib=calib, progress=False)
        record(label, "PTQ", q, time.perf_counter() - t0)
    for label, cfg in QAT.items():
        t0 = time.perf_counter()
        learned = (lt.preset(cfg) if isinstance(cfg, str) else cfg).with_learned_scales()
        q = lt.quantize(model, learned, calib=calib, qat=True, progress=False)
        train(q, x_train, y_train, epochs=epochs, lr=0.01, schedule="cosine", seed=1, desc=label, teacher=model)
        record(label, f"QAT {epochs:g} ep", q, time.perf_counter() - t0)
    return {"rows": rows, "log2_rounding_rel_mse": log2_rounding_error(model), "qat_epochs": epochs,
            "test_images": len(x_test)}  # fmt: skip


def render(results: dict) -> str:
    lines = [
        "## Number formats: 1, 2 and log2-bit weights",
        "",
        "`python benchmarks/lowbit_weights_bench.py` (issue 27). Int8 activations throughout; binary, ternary and "
        "2-bit presets keep the first and last weighted layers at int8 weights (`keep_ends_8bit`). Top-1 of the "
        "fake-quantized PyTorch model and of its ONNX export in ONNX Runtime; weight bytes packed "
        "(bits x weights + float32 scales + float biases) beside the ONNX file (codes stored as int8).",
        "",
    ]
    for model, r in results["models"].items():
        headers = ["format", "method", "top-1", "ORT top-1", "packed bytes", "ONNX bytes", "seconds"]
        table_rows = []
        for label, row in r["rows"].items():
            table_rows.append([
                label.rsplit(" PTQ", 1)[0].rsplit(" QAT", 1)[0], row["method"], f"{100 * row['top1']:.2f}",
                f"{100 * row['onnx_top1']:.2f}" if "onnx_top1" in row else "-", f"{row['bytes']:,.0f}",
                f"{row['onnx_bytes']:,}" if "onnx_bytes" in row else "-",
                f"{row['seconds']:.0f}" if "seconds" in row else "-",
            ])  # fmt: skip
        err = r["log2_rounding_rel_mse"]
        lines += [
            f"### {model} ({r['test_images']:,} test images, QAT {r['qat_epochs']:g} epoch(s) per row)",
            "",
            "```",
            format_table(headers, table_rows),
            "```",
            "",
            f"log2 rounding, relative squared weight error at 4 bits: linear-domain nearest {err['linear']:.4f}, "
            f"log-domain {err['log']:.4f}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn"], choices=["cnn", "mobilenet"])
    parser.add_argument("--epochs", type=float, default=1.0, help="QAT epochs per row (default 1)")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="0.05 QAT epoch, 1,000 test images, nothing written")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.test_images, args.no_write = 0.05, 1000, True
    torch.manual_seed(0)
    results = {"machine": {**machine(), "torch": torch.__version__}, "models": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-weights-bench-") as tmp:
        for name in args.models:
            results["models"][f"Fashion-MNIST {name}"] = bench(name, Path(tmp), args.epochs, args.test_images)
    results["seconds"] = time.perf_counter() - t0
    text = render(results)
    print("\n" + text)
    if not args.no_write:
        earlier = DOCS / "benchmarks" / "lowbit-weights.json"
        if earlier.exists():  # models not run this time keep their rows (each row names its epochs)
            kept = json.loads(earlier.read_text()).get("models", {})
            results["models"] = {**{k: v for k, v in kept.items() if k not in results["models"]}, **results["models"]}
            text = render(results)
        write_section("lowbit-weights", text, results)


if __name__ == "__main__":
    main()
