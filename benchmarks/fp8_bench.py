"""FP8 (E4M3FN, E5M2) PTQ beside FP32 and INT8 on the Fashion-MNIST models, in PyTorch and in ONNX Runtime.

    python benchmarks/fp8_bench.py            # 10,000 test images, 1,000 calibration images
    python benchmarks/fp8_bench.py --quick    # 2,000 test images, 300 calibration images

Writes the "fp8" section of docs/BENCHMARKS.md ("Number formats: FP8") and docs/benchmarks/fp8.json. Each model
is quantized with lowbit.torch (weights per output channel, activations per tensor), exported to ONNX (FP8: FLOAT8
Q/DQ at opset 19, weights stored as FP8) and run in ONNX Runtime's CPU provider; the table gives both top-1s, the
file size and ORT's median latency for a batch of 64 images (ONNX Runtime's CPU has no FP8 kernels: it runs the
FP8 Q/DQ as a cast to and from float8 around float kernels, so FP8 measures emulation, not FP8 speed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit.torch as lt
from _common import machine, median_ms, write_section
from lowbit._table import format_table
from lowbit.examples import fashion_mnist
from torch_models import pretrained_fashion
from train_fashion import evaluate

CONFIGS = {  # label -> (preset, activation method or None for the preset's own)
    "INT8": ("int8", None),
    "FP8 E4M3 (max)": ("fp8_e4m3", None),
    "FP8 E4M3 (mse)": ("fp8_e4m3", "mse"),
    "FP8 E4M3 (entropy)": ("fp8_e4m3", "entropy"),
    "FP8 E5M2 (max)": ("fp8_e5m2", None),
}


def _ort(path: Path, x: np.ndarray, y: np.ndarray, basic: bool = False) -> tuple[float, float]:
    """Top-1 of the ONNX model at ``path`` in ONNX Runtime (CPU) and its median latency (ms) for 64 images;
    ``basic``: graph optimizations up to ORT_ENABLE_BASIC only."""
    so = ort.SessionOptions()
    if basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, {"input": x[i : i + 1000]})[0] for i in range(0, len(x), 1000)])
    return float((out.argmax(1) == y).mean()), median_ms(sess, {"input": x[:64]}, runs=20, warmup=3)


def _float_onnx(model, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {"input": {0: "batch"}, "output": {0: "batch"}}
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes=axes)  # fmt: skip
    return path


def bench(name: str, work: Path, test_images: int, calib_images: int) -> dict:
    x_train, _ = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    x_test, y_test = x_test[:test_images], y_test[:test_images]
    pick = np.random.default_rng(0).choice(len(x_train), calib_images, replace=False)
    calib = [torch.from_numpy(x_train[pick[i : i + 100]]) for i in range(0, len(pick), 100)]
    example = calib[0][:8]
    model = pretrained_fashion(name)
    path = _float_onnx(model, example, work / f"{name}_fp32.onnx")
    top1, ms = _ort(path, x_test, y_test)
    rows = {"FP32": {"top1": evaluate(model, x_test, y_test), "onnx_top1": top1, "ort_ms": ms,
                     "size_mb": path.stat().st_size / 1e6}}  # fmt: skip
    print(f"{name} FP32 {rows['FP32']}")
    for label, (preset, method) in CONFIGS.items():
        cfg = lt.preset(preset) if method is None else lt.preset(preset).with_method(method)
        t0 = time.perf_counter()
        q = lt.quantize(model, cfg, calib=calib, progress=False)
        seconds = time.perf_counter() - t0
        path = lt.export_onnx(q, example, work / f"{name}_{preset}_{method}.onnx")
        fp8 = preset.startswith("fp8")
        top1, ms = _ort(path, x_test, y_test, basic=fp8)
        rows[label] = {"top1": evaluate(q, x_test, y_test), "onnx_top1": top1, "ort_ms": ms,
                       "size_mb": path.stat().st_size / 1e6, "quantize_s": seconds}  # fmt: skip
        if fp8:  # ONNX Runtime's default (all graph optimizations)
            try:
                rows[label]["onnx_top1_all_opt"] = _ort(path, x_test, y_test)[0]
            except Exception as exc:  # ORT's Clip+QuantizeLinear fusion fails on a FLOAT8 zero point
                rows[label]["onnx_top1_all_opt"] = f"fails: {str(exc).splitlines()[0][-90:]}"
        print(f"{name} {label} {rows[label]}")
    return {"samples": {"calibration": calib_images, "evaluation": len(x_test)}, "rows": rows}


def render(results: dict) -> str:
    titles = {"cnn": "FashionCNN", "mobilenet": "FashionMobileNet (MobileNetV2-style)"}
    parts = ["## Number formats: FP8", "",
             "`python benchmarks/fp8_bench.py` (`--quick`: fewer images). PTQ with lowbit.torch, weights per output "
             "channel, activations per tensor (INT8: the `int8` preset, activations by MSE; FP8: the `fp8_e4m3` / "
             "`fp8_e5m2` presets, scale = amax / 448 or / 57344, activations by max unless the row says otherwise). "
             "ORT top-1 is the exported model (FP8: FLOAT8E4M3FN / FLOAT8E5M2 Q/DQ, opset 19) in ONNX Runtime "
             f"{ort.__version__} CPU; latency: median of 20 runs, batch 64, on {machine().get('cpu', 'this CPU')}. "
             "ONNX Runtime's CPU has no FP8 kernels: FP8 Q/DQ stays as casts around float kernels (no fusion), so its "
             "latency is emulation, not what FP8 hardware (Hopper, Blackwell with TensorRT) runs. FP8 rows run with "
             "graph optimizations up to ORT_ENABLE_BASIC: with ONNX Runtime's default (all optimizations) its CPU "
             "QDQ transformers mis-handle FLOAT8 Q/DQ (wrong outputs, or a Clip+QuantizeLinear fusion that refuses "
             "a FLOAT8 zero point at load); the column 'all optimizations' shows what they give.", ""]  # fmt: skip
    for name, res in results["models"].items():
        s = res["samples"]
        line = f"Calibration on {s['calibration']} training images, top-1 on {s['evaluation']} test images."
        parts += [f"### {titles[name]}", "", line, ""]
        header = ["format", "PyTorch top-1", "ORT top-1", "ORT top-1, all optimizations", "ORT ms (batch 64)", "MB"]
        table = []
        for label, r in res["rows"].items():
            full = r.get("onnx_top1_all_opt", r["onnx_top1"])
            full = f"{full:.2%}" if isinstance(full, float) else "fails to load"
            table.append([label, f"{r['top1']:.2%}", f"{r['onnx_top1']:.2%}", full, f"{r['ort_ms']:.1f}",
                          f"{r['size_mb']:.2f}"])  # fmt: skip
        parts += [format_table(header, table), ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 test images, 300 calibration images")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/ alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    test_images, calib_images = (2000, 300) if args.quick else (10000, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"models": {n: bench(n, Path(tmp), test_images, calib_images) for n in ("cnn", "mobilenet")}}
    results["machine"] = machine()
    text = render(results)
    print(text)
    if not args.no_write:
        write_section("fp8", text, results)


if __name__ == "__main__":
    main()
