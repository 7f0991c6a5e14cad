"""A text recogniser's shape, quantized for ONNX Runtime: does INT8 run faster than FP32 when the model's
activations are hard-swish chains exported the way Paddle2ONNX writes them?

    pip install --no-deps rapidocr-onnxruntime      # PP-OCRv4's recogniser as ONNX (optional; files only)
    python benchmarks/recogniser_bench.py            # about 6 minutes on a 2-core machine
    python benchmarks/recogniser_bench.py --quick    # fewer samples and timing rounds

The model (built here in PyTorch with seeded random weights; no pretrained recogniser installs offline): a
PP-LCNet-style backbone at scale 0.5 (depthwise-separable blocks, squeeze-excite in the last two, strides (2, 1)
so the width stays a sequence), with every hard-swish written ``x * Clip(x + 3, 0, 6) / 6`` and every hard-sigmoid
``Clip(x + 3, 0, 6) / 6``, then an SVTR-style neck (two transformer blocks of width 120 with swish MLPs) and a CTC
head over 6,625 characters. BatchNormalization statistics are set by forward passes over the calibration images so
activations have real ranges, and its scale to 0.5: at 1 a random network this deep is chaotic (one layer's INT8
noise at 28 dB SQNR reaches the output at 3 dB, any INT8 model's logits are noise) where a trained one is not.
Input 3x48x320, crops of the real photos shipped by scikit-image and scikit-learn.

Measured: FP32 (the exported model) against lowbit's default INT8 (``--target ort``: hard-swish and hard-sigmoid
recognised, then run as QLinearAdd + QLinearMul with their constant divisions folded into scales) and, with
``--baseline DIR``, the INT8 of another lowbit checkout (``git worktree add /tmp/lowbit-old 3349c16`` is the commit
before this work): latency at batch 1 and 8 (median of interleaved rounds),
the share of time in float and conversion kernels from ONNX Runtime's profile (what
``lowbit inspect`` reports), and the agreement of the greedy CTC decoding with FP32's (character error rate of
INT8's decoded string against FP32's, per-time-step top-1 agreement, cosine and SQNR of the logits) on held-out
crops. Random weights say nothing about reading text, and their 6,625 logits per step are nearly tied (a random
head has no confident class), so top-1 and CER figures are harsh on any INT8 here; the logits' SQNR is the fairer
view.

Writes the "recogniser" section of docs/BENCHMARKS.md and docs/benchmarks/recogniser.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section

BUILT = "built here"
REAL = "PP-OCRv4 rec"
CLASSES = 6625
GAIN = 0.5  # BatchNormalization's scale after its statistics are set (see export)
HEIGHT, WIDTH = 48, 320


def _torch_model(seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class HardSwish(nn.Module):  # as Paddle2ONNX exports it
        def forward(self, x):
            return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0

    class HardSigmoid(nn.Module):
        def forward(self, x):
            return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0

    def conv_bn(cin, cout, k, stride, groups=1):
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), HardSwish()
        )

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Sequential(nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c, 1), HardSigmoid())

        def forward(self, x):
            return x * self.fc(self.pool(x))

    class DepSep(nn.Module):
        def __init__(self, cin, cout, k, stride, se):
            super().__init__()
            self.dw = conv_bn(cin, cin, k, stride, groups=cin)
            self.se = SE(cin) if se else nn.Identity()
            self.pw = conv_bn(cin, cout, 1, 1)

        def forward(self, x):
            return self.pw(self.se(self.dw(x)))

    # PP-LCNet's blocks (kernel, in, out, stride, squeeze-excite) at scale 0.5, strides (2, 1) as in recognition
    config = [
        (3, 16, 32, 1, False), (3, 32, 64, 2, False), (3, 64, 64, 1, False), (3, 64, 128, (2, 1), False),
        (3, 128, 128, 1, False), (3, 128, 256, (2, 1), False), *[(5, 256, 256, 1, False)] * 5,
        (5, 256, 512, (2, 1), True), (5, 512, 512, 1, True),
    ]  # fmt: skip
    half = [(cin // 2, cout // 2, k, s, se) for k, cin, cout, s, se in config]

    class Block(nn.Module):  # SVTR's global mixing: pre-norm attention and a swish MLP
        def __init__(self, dim, heads=8):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            y = self.n1(x)
            x = x + self.attn(y, y, y, need_weights=False)[0]
            return x + self.mlp(self.n2(x))

    class Recogniser(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(3, 8, 3, 2)
            self.blocks = nn.Sequential(*[DepSep(*c) for c in half])
            self.pool = nn.AvgPool2d((2, 1))  # H 2 -> 1: 80 time steps
            self.neck_in = nn.Sequential(nn.Conv2d(256, 120, 1), nn.BatchNorm2d(120), HardSwish())
            self.neck = nn.Sequential(Block(120), Block(120))
            self.head = nn.Linear(120, CLASSES)

        def forward(self, x):
            x = self.neck_in(self.pool(self.blocks(self.stem(x))))
            x = x.flatten(2).transpose(1, 2)  # (N, T, C)
            return self.head(self.neck(x))

    return Recogniser()


def images(count: int, seed: int) -> np.ndarray:
    """``count`` crops of the photos as (N, 3, 48, 320) float32, normalised to [-1, 1] (PaddleOCR's)."""
    from lowbit.examples import photo_crops, pil_image

    Image = pil_image()
    out = []
    for _, crop in photo_crops(count, seed, size=320):
        strip = np.asarray(Image.fromarray(crop).resize((WIDTH, HEIGHT), Image.BILINEAR), np.float32)
        out.append(strip.transpose(2, 0, 1) / 127.5 - 1)
    return np.stack(out)


def export(path: Path, calib: np.ndarray) -> None:
    import torch

    model = _torch_model()
    model.train()
    with torch.no_grad():  # BatchNorm statistics of these images, so activations have realistic ranges
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        for i in range(0, len(calib), 32):
            model(torch.from_numpy(calib[i : i + 32]))
        # At unit gain this random network is chaotic (a perturbation anywhere, INT8 noise of 28 dB in one layer,
        # grows to 3 dB at the output); trained networks are not. At gain 0.5 it is not either.
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(GAIN)
                m.bias.zero_()
    model.eval()
    example = torch.from_numpy(calib[:1])
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=17, input_names=["image"],
        output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )  # fmt: skip


def greedy_ctc(logits: np.ndarray) -> list[list[int]]:
    """CTC greedy decoding (class 0 is the blank): the best class of each step, repeats merged, blanks dropped."""
    out = []
    for best in logits.argmax(-1):
        keep = np.concatenate([[True], best[1:] != best[:-1]]) & (best != 0)
        out.append(best[keep].tolist())
    return out


def edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def accuracy(reference: np.ndarray, logits: np.ndarray) -> dict:
    ref, ours = greedy_ctc(reference), greedy_ctc(logits)
    errors = sum(edit_distance(r, o) for r, o in zip(ref, ours, strict=True))
    chars = max(sum(len(r) for r in ref), 1)
    a, b = reference.reshape(-1, reference.shape[-1]).astype(np.float64), logits.reshape(-1, logits.shape[-1])
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {
        "logit_cosine": float(cosine.mean()),
        "logit_sqnr_db": float(10 * np.log10((a**2).sum() / ((a - b) ** 2).sum())),
        "cer_vs_fp32": errors / chars,
        "step_agreement": float((reference.argmax(-1) == logits.argmax(-1)).mean()),
        "strings_equal": float(np.mean([r == o for r, o in zip(ref, ours, strict=True)])),
    }


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 16]})[0] for i in range(0, len(x), 16)])


def _quantize(src: Path, dst: Path, calib: np.ndarray) -> dict:
    from lowbit.onnx import Options, quantize

    result = quantize(src, dst, calib, "int8", options=Options(compare=False, progress=False))
    return {"fused": result.fused, "seconds": result.seconds}


def _quantize_with(source: Path, src: Path, dst: Path, calib: np.ndarray) -> dict:
    """``lowbit quantize`` (its defaults) of another lowbit source tree (``source``: its ``src`` folder), in a
    Python of its own."""
    import onnx

    npz = dst.with_suffix(".calib.npz")
    np.savez(npz, **{onnx.load(str(src), load_external_data=False).graph.input[0].name: calib})
    code = "import sys; sys.path.insert(0, sys.argv[1]); from lowbit.cli import main; sys.exit(main(sys.argv[2:]))"
    argv = [str(src), "--calib", str(npz), "-o", str(dst), "--no-compare"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(source), "quantize", *argv], check=True, capture_output=True)
    return {"seconds": time.perf_counter() - started}


def _shares(path: Path, feed: dict) -> dict:
    from lowbit.onnx import kernels

    prof = kernels.profile(path, feed, runs=5, warmup=2)
    total = prof.total_ms() or 1.0
    return {kind: prof.total_ms(kind) / total for kind in kernels.KINDS} | {"profile_ms": prof.total_ms()}


def real_recogniser() -> Path | None:
    """PP-OCRv4's recogniser as the rapidocr-onnxruntime package ships it (``pip install --no-deps
    rapidocr-onnxruntime``), or None."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    return path if path.is_file() else None


def bench(src: Path | None, samples: int, held: int, rounds: int, baseline: Path | None, work: Path) -> dict:
    """FP32 (``src``, or the model built here when None), lowbit's INT8 and the baseline's: speed, kernel shares,
    agreement with FP32."""
    from lowbit.onnx.compare import interleaved_latency_ms

    calib, test = images(samples, seed=1), images(held, seed=2)
    rows: dict[str, dict] = {}
    paths = {"FP32": src or work / "fp32.onnx", "INT8 lowbit": work / "int8.onnx"}
    if src is None:
        export(paths["FP32"], calib)
    rows["FP32"] = {}
    rows["INT8 lowbit"] = _quantize(paths["FP32"], paths["INT8 lowbit"], calib)
    if baseline is not None:
        label = f"INT8 lowbit at {baseline.name}"
        paths[label] = work / "baseline.onnx"
        rows[label] = _quantize_with(baseline / "src", paths["FP32"], paths[label], calib)
    reference = _outputs(paths["FP32"], test)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for k, p in paths.items()}  # fmt: skip
    name = sessions["FP32"].get_inputs()[0].name
    for label, path in paths.items():
        rows[label].update(_shares(path, {name: test[:8]}))
        rows[label]["size_mb"] = path.stat().st_size / 1e6
        if label != "FP32":
            rows[label].update(accuracy(reference, _outputs(path, test)))
    for b in (1, 8):
        for label, ms in interleaved_latency_ms(sessions, {name: test[:b]}, rounds=rounds).items():
            rows[label].setdefault("latency_ms", {})[b] = ms
    return rows


def run(samples: int, held: int, rounds: int, baseline: Path | None) -> dict:
    models = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-recogniser-") as tmp:
        models[BUILT] = bench(None, samples, held, rounds, baseline, Path(tmp))
    real = real_recogniser()
    if real is not None:
        with tempfile.TemporaryDirectory(prefix="lowbit-recogniser-") as tmp:
            models[REAL] = bench(real, samples, held, rounds, baseline, Path(tmp))
    return {"machine": machine(), "samples": samples, "held_out": held, "models": models,
            **({} if real else {"missing": "pip install --no-deps rapidocr-onnxruntime"})}  # fmt: skip


def render(results: dict) -> str:
    from lowbit._table import format_table

    table = []
    for model, rows in results["models"].items():
        fp32 = rows["FP32"]["latency_ms"]
        for label, r in rows.items():
            lat = r["latency_ms"]
            table.append([
                f"{model}: {label}", f"{lat[1]:.2f}", f"{lat[8]:.2f}", f"x{fp32[8] / lat[8]:.2f}",
                f"{r['float'] * 100:.0f}%", f"{r['convert'] * 100:.0f}%", f"{r['integer'] * 100:.0f}%",
                f"{r['size_mb']:.2f}",
                "-" if "cer_vs_fp32" not in r else f"{r['cer_vs_fp32'] * 100:.2f}%",
                "-" if "step_agreement" not in r else f"{r['step_agreement'] * 100:.2f}%",
                "-" if "logit_cosine" not in r else f"{r['logit_cosine']:.4f}",
                "-" if "logit_sqnr_db" not in r else f"{r['logit_sqnr_db']:.1f}",
            ])  # fmt: skip
    head = ["model", "ms b=1", "ms b=8", "vs FP32 b=8", "float", "convert", "integer", "MB", "CER vs FP32",
            "step top-1 agr.", "logit cos", "SQNR dB"]  # fmt: skip
    fused = {m: r["INT8 lowbit"].get("fused", {}) for m, r in results["models"].items()}
    rewritten = "; ".join(f"{m}: {', '.join(f'{n} {op}' for op, n in f.items()) or 'none'}" for m, f in fused.items())
    m = results["machine"]
    return "\n".join([
        "## A text recogniser's shape (hard-swish chains)", "",
        f"`python benchmarks/recogniser_bench.py` ({m['date']}; {m['cpu']}, {m['cores']} cores, ONNX Runtime "
        f"{m['onnxruntime']}). PP-LCNet-style backbone (scale 0.5, hard-swish exported as `x * Clip(x + 3, 0, 6) / 6`) "
        "+ SVTR-style neck + CTC head over 6,625 classes, seeded random weights, input 3x48x320; and PP-OCRv4's "
        "recogniser as rapidocr-onnxruntime ships it (Paddle2ONNX, opset 12: hard-swish as Add/Clip/Mul/Div inside "
        f"learnable affine blocks){' - not installed: ' + results['missing'] if 'missing' in results else ''}. "
        f"Calibration on {results['samples']} photo crops, agreement with FP32's greedy CTC decoding on "
        f"{results['held_out']} others (photos, not text lines: the CER of such decodings says little). "
        "Shares of kernel time from ONNX Runtime's profile at batch 8 (as `lowbit inspect` reports them). "
        f"Rewritten: {rewritten}.", "",
        "```", format_table(head, table, "lrrrrrrrrrrr"), "```", "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and timing rounds")
    parser.add_argument("--baseline", type=Path, help="a checkout of another lowbit commit to compare with "
                        "(git worktree add /tmp/lowbit-old COMMIT), quantized with its defaults")  # fmt: skip
    args = parser.parse_args()
    samples, held, rounds = (32, 16, 1) if args.quick else (256, 128, 7)
    results = run(samples, held, rounds, args.baseline)
    text = render(results)
    write_section("recogniser", text, results)
    print(text)


if __name__ == "__main__":
    main()
