"""FP8 (E4M3FN, E5M2) PTQ beside FP32 and INT8: the Fashion-MNIST models through lowbit.torch (PyTorch and ONNX
Runtime), EfficientNet-Lite0 and all-MiniLM-L6-v2 through the ONNX front end (``lowbit quantize --format fp8``).

    python benchmarks/fp8_bench.py            # 10,000 test images, 1,000 calibration images; EfficientNet-Lite0:
                                              # 1,000 crops, 256 calibration crops; MiniLM: 512 + 256 sentences
    python benchmarks/fp8_bench.py --quick    # 2,000 / 300 images; 200 / 32 crops; 128 + 64 sentences
    python benchmarks/fp8_bench.py --onnx-only    # EfficientNet-Lite0 and MiniLM only

Writes the "fp8" section of docs/BENCHMARKS.md ("Number formats: FP8") and docs/benchmarks/fp8.json. Each model
is quantized with lowbit.torch (weights per output channel, activations per tensor), exported to ONNX (FP8: FLOAT8
Q/DQ at opset 19, weights stored as FP8) and run in ONNX Runtime's CPU provider; the table gives both top-1s, the
file size and ORT's median latency for a batch of 64 images (ONNX Runtime's CPU has no FP8 kernels: it runs the
FP8 Q/DQ as a cast to and from float8 around float kernels, so FP8 measures emulation, not FP8 speed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit.torch as lt
from _common import DOCS, machine, median_ms, write_section
from lowbit._table import format_table
from lowbit.examples import (
    WordPiece,
    efficientnet_input,
    efficientnet_lite0_onnx,
    fashion_mnist,
    minilm_onnx,
    photo_crops,
    photos,
    sentences,
)
from lowbit.onnx import Options, quantize
from lowbit.onnx.model import session
from lowbit.onnx.settings import edit
from lowbit.recipe import preset as recipe_preset
from torch_models import pretrained_fashion
from train_fashion import evaluate

CONFIGS = {  # label -> (preset, activation method or None for the preset's own)
    "INT8": ("int8", None),
    "FP8 E4M3 (max)": ("fp8_e4m3", None),
    "FP8 E4M3 (mse)": ("fp8_e4m3", "mse"),
    "FP8 E4M3 (entropy)": ("fp8_e4m3", "entropy"),
    "FP8 E5M2 (max)": ("fp8_e5m2", None),
}


def _ort(path: Path, x: np.ndarray, y: np.ndarray, no_opt: bool = False) -> tuple[float, float]:
    """Top-1 of the ONNX model at ``path`` in ONNX Runtime (CPU) and its median latency (ms) for 64 images;
    ``no_opt``: no graph optimization (ORT_DISABLE_ALL), as an FP8 model must run on ONNX Runtime 1.32's CPU."""
    so = ort.SessionOptions()
    if no_opt:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
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
        top1, ms = _ort(path, x_test, y_test, no_opt=fp8)
        rows[label] = {"top1": evaluate(q, x_test, y_test), "onnx_top1": top1, "ort_ms": ms,
                       "size_mb": path.stat().st_size / 1e6, "quantize_s": seconds}  # fmt: skip
        if fp8:  # ONNX Runtime's default (all graph optimizations)
            try:
                rows[label]["onnx_top1_all_opt"] = _ort(path, x_test, y_test)[0]
            except Exception as exc:  # ORT's Clip+QuantizeLinear fusion fails on a FLOAT8 zero point
                rows[label]["onnx_top1_all_opt"] = f"fails: {str(exc).splitlines()[0][-90:]}"
        print(f"{name} {label} {rows[label]}")
    return {"samples": {"calibration": calib_images, "evaluation": len(x_test)}, "rows": rows}


ONNX_ROWS = {  # label -> recipe: the ONNX front end's defaults for each (INT8: mse, GPTQ, bias correction)
    "INT8 --target ort (default)": "int8",
    "INT8 --target trt": "int8_trt",
    "FP8 E4M3 --format fp8 (max)": "fp8",
    "FP8 E4M3 --format fp8 --method mse": ("fp8", "mse"),
}


def _recipe(row):
    return recipe_preset(row) if isinstance(row, str) else edit(recipe_preset(row[0]), method=row[1])


def _run(path: Path, feeds: list[dict]) -> np.ndarray:
    """The first output of the model at ``path`` on each feed, through lowbit's session (an FP8 model with no
    graph optimization, as it must run)."""
    sess = session(path)
    return np.concatenate([sess.run(None, f)[0] for f in feeds])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def bench_onnx(name: str, src: Path, calib, feeds: list[dict], timing: dict, work: Path, score) -> dict:
    """Each row of :data:`ONNX_ROWS` quantized by lowbit.onnx.quantize on ``calib``: ``score(ref, out)`` against
    FP32 on ``feeds``, quantization seconds, file size and ORT CPU median latency on ``timing``."""
    ref = _run(src, feeds)
    timed = {"FP32": session(src)}
    rows = {"FP32": {"size_mb": src.stat().st_size / 1e6}}
    for label, row in ONNX_ROWS.items():
        dst = work / f"{name}_{len(rows)}.onnx"
        t0 = time.perf_counter()
        quantize(src, dst, calib, _recipe(row), options=Options(compare=False, progress=False))
        rows[label] = {"quantize_s": time.perf_counter() - t0, "size_mb": dst.stat().st_size / 1e6,
                       **score(ref, _run(dst, feeds))}  # fmt: skip
        timed[label] = session(dst)
        print(f"{name} {label} {rows[label]}")
    for label, sess in timed.items():
        rows[label]["latency_ms"] = median_ms(sess, timing, runs=10, warmup=2)
    return rows


def bench_efficientnet(work: Path, crops: int, calib_crops: int) -> dict:
    """EfficientNet-Lite0 (ImageNet weights): top-1 agreement with FP32 on ``crops`` crops of real photos (seed
    1), calibration on ``calib_crops`` others (seed 0), as benchmarks/easyquant_bench.py."""
    src = work / "efficientnet_lite0.onnx"
    onnx.save(efficientnet_lite0_onnx(), str(src))
    images = photos()
    calib = efficientnet_input(np.stack([c for _, c in photo_crops(calib_crops, 0, images=images)]))
    test = efficientnet_input(np.stack([c for _, c in photo_crops(crops, 1, images=images)]))
    np.save(work / "calib.npy", calib)
    feeds = [{"image": test[i : i + 50]} for i in range(0, len(test), 50)]

    def agreement(ref, out):
        return {"agreement": float((ref.argmax(1) == out.argmax(1)).mean())}

    rows = bench_onnx("efficientnet", src, work / "calib.npy", feeds, {"image": test[:8]}, work, agreement)
    return {"samples": {"calibration": len(calib), "evaluation": len(test)}, "rows": rows, "batch": 8}


def bench_minilm(work: Path, count: int, calib_count: int) -> dict:
    """all-MiniLM-L6-v2: mean (and least) cosine of each sentence embedding to FP32's, static quantization
    calibrated on ``calib_count`` other sentences, as benchmarks/onnx_bench.py."""
    src = work / "minilm.onnx"
    onnx.save(minilm_onnx(), str(src))
    tokenizer = WordPiece()
    texts = sentences(count + calib_count)
    texts, calib_texts = texts[:count], texts[count:]
    feeds = [tokenizer(texts[i : i + 32]) for i in range(0, len(texts), 32)]
    calib = [tokenizer(calib_texts[i : i + 32]) for i in range(0, len(calib_texts), 32)]

    def cosine(ref, out):
        c = _cosines(ref, out)
        return {"cosine": float(c.mean()), "min_cosine": float(c.min())}

    rows = bench_onnx("minilm", src, calib, feeds, tokenizer(texts[:8]), work, cosine)
    return {"samples": {"calibration": len(calib_texts), "evaluation": len(texts)}, "rows": rows, "batch": 8}


def render_onnx(results: dict) -> str:
    """The ONNX front end's part of the section: EfficientNet-Lite0 agreement and MiniLM cosine, with latency."""
    parts = ["### The ONNX front end: EfficientNet-Lite0 and all-MiniLM-L6-v2", "",
             "`lowbit quantize MODEL.onnx --format fp8` (E4M3FN; FLOAT8 Q/DQ at opset 19, weights per output channel "
             "stored as FP8, activations per tensor by max unless the row says otherwise, biases float, weights "
             "rounded to nearest, bias correction on; laid out for TensorRT, `--target trt`) beside INT8 with the "
             "front end's defaults (mse ranges, GPTQ, bias correction) for ONNX Runtime (`--target ort`) and for "
             "TensorRT (`--target trt`, the like-for-like layout). Latency: ONNX Runtime "
             f"{ort.__version__} CPU, median of 10 runs at batch 8, on {machine().get('cpu', 'this CPU')}, FP8 at "
             "ORT_DISABLE_ALL (its default, ORT_ENABLE_ALL, computes FP8 Q/DQ wrongly, ORT_ENABLE_BASIC E5M2), on a "
             "shared, loaded machine: "
             "rough figures. ONNX Runtime's CPU has no "
             "FP8 kernels: the FP8 latency is emulation (casts around float kernels), not FP8 speed; a `--target "
             "trt` layout is for TensorRT, not for ORT's integer kernels either.", ""]  # fmt: skip
    efficient, minilm = results.get("efficientnet"), results.get("minilm")
    if efficient:
        s = efficient["samples"]
        quick = " (`--quick`: fewer than the 1,000 / 256 of the protocol)" if s["evaluation"] < 1000 else ""
        parts += [f"EfficientNet-Lite0 (ImageNet weights), top-1 agreement with FP32 on {s['evaluation']} crops of "
                  f"real photos (seed 1), calibration on {s['calibration']} others (seed 0){quick}. FP8 PTQ loses "
                  "far more here than INT8 with its GPTQ and bias correction: E4M3's 3 mantissa bits give every "
                  "weight and activation up to 6% relative error, which the depthwise / linear-bottleneck blocks "
                  "amplify, and no integer-code refinement applies to FP8.", ""]  # fmt: skip
        table = [[k, "-" if k == "FP32" else f"{r['agreement']:.1%}", f"{r['latency_ms']:.1f}", f"{r['size_mb']:.2f}",
                  "-" if k == "FP32" else f"{r['quantize_s']:.0f}"] for k, r in efficient["rows"].items()]  # fmt: skip
        parts += [format_table(["model", "top-1 agreement", "ORT ms (b=8)", "MB", "quantize s"], table), ""]
    if minilm:
        s = minilm["samples"]
        parts += [f"all-MiniLM-L6-v2, static quantization: cosine of each embedding to FP32's on {s['evaluation']} "
                  f"sentences, calibration on {s['calibration']} others.", ""]  # fmt: skip
        table = [[k, "-" if k == "FP32" else f"{r['cosine']:.5f}", "-" if k == "FP32" else f"{r['min_cosine']:.4f}",
                  f"{r['latency_ms']:.1f}", f"{r['size_mb']:.1f}", "-" if k == "FP32" else f"{r['quantize_s']:.0f}"]
                 for k, r in minilm["rows"].items()]  # fmt: skip
        parts += [format_table(["model", "mean cosine", "least cosine", "ORT ms (b=8)", "MB", "quantize s"], table),
                  ""]  # fmt: skip
    return "\n".join(parts)


def render(results: dict) -> str:
    titles = {"cnn": "FashionCNN", "mobilenet": "FashionMobileNet (MobileNetV2-style)"}
    parts = ["## Number formats: FP8", "",
             "`python benchmarks/fp8_bench.py` (`--quick`: fewer images, crops and sentences). PTQ with lowbit.torch, "
             "weights per output channel, activations per tensor (INT8: the `int8` preset, activations by MSE; FP8: "
             "the `fp8_e4m3` / `fp8_e5m2` presets, scale = amax / 448 or / 57344, activations by max unless the row "
             "says otherwise). "
             "ORT top-1 is the exported model (FP8: FLOAT8E4M3FN / FLOAT8E5M2 Q/DQ, opset 19) in ONNX Runtime "
             f"{ort.__version__} CPU; latency: median of 20 runs, batch 64, on {machine().get('cpu', 'this CPU')}. "
             "ONNX Runtime's CPU has no FP8 kernels: FP8 Q/DQ stays as casts around float kernels (no fusion), so its "
             "latency is emulation, not what FP8 hardware (Hopper, Blackwell with TensorRT) runs. FP8 rows run with "
             "no graph optimization (ORT_DISABLE_ALL; at ORT_ENABLE_BASIC E5M2 still comes out wrong): with ONNX "
             "Runtime's default (all optimizations) its CPU "
             "QDQ transformers mis-handle FLOAT8 Q/DQ (wrong outputs, or a Clip+QuantizeLinear fusion that refuses "
             "a FLOAT8 zero point at load); the column 'all optimizations' shows what they give.", ""]  # fmt: skip
    for name, res in results.get("models", {}).items():
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
    if results.get("onnx"):
        parts.append(render_onnx(results["onnx"]))
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (2,000 / 300), crops (200 / 32) and "
                        "sentences (128 / 64)")  # fmt: skip
    parser.add_argument("--onnx-only", action="store_true", help="EfficientNet-Lite0 and MiniLM only")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/ alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    test_images, calib_images = (2000, 300) if args.quick else (10000, 1000)
    crops, calib_crops, count, calib_count = (200, 32, 128, 64) if args.quick else (1000, 256, 512, 256)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.onnx_only:
            results["models"] = {n: bench(n, Path(tmp), test_images, calib_images) for n in ("cnn", "mobilenet")}
        elif (DOCS / "benchmarks" / "fp8.json").exists():  # keep the Fashion-MNIST figures of the last full run
            results["models"] = json.loads((DOCS / "benchmarks" / "fp8.json").read_text()).get("models", {})
        results["onnx"] = {"efficientnet": bench_efficientnet(Path(tmp), crops, calib_crops),
                           "minilm": bench_minilm(Path(tmp), count, calib_count)}  # fmt: skip
    results["machine"] = machine()
    text = render(results)
    print(text)
    if not args.no_write:
        write_section("fp8", text, results)


if __name__ == "__main__":
    main()
