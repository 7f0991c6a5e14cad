"""Models whose compute sits inside If, Loop and Scan bodies, quantized by lowbit and by ONNX Runtime's
``quantize_static``: what runs on integers inside the bodies, and how close the outputs stay to FP32.

    pip install --no-deps silero-vad     # Silero VAD's ONNX files (only its files are read; nothing downloads)
    python benchmarks/controlflow_bench.py   # under a minute on a 2-core machine

Models:
  - three built in code (tests/onnx/controlflow_models.py, seeded random weights): an If whose branches hold two
    Convs and one Conv (chosen by a boolean input; calibration takes both), a Loop of 3 steps around a MatMul,
    a Scan over 5 steps with two MatMuls;
  - Silero VAD v5 (``silero_vad.onnx`` from the silero-vad package, when installed): its whole network sits
    inside an If on the sample rate. No speech recordings install offline, so it is calibrated and compared on
    synthetic 36 ms frames at 16 kHz (harmonic voiced sounds with noise, silence with noise; seeded), one frame per
    batch with a zero LSTM state as a stream starts: the figures say how close INT8 stays to FP32's speech
    probability, not how well either detects speech.

Writes the "control flow" section of docs/BENCHMARKS.md and docs/benchmarks/controlflow.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, median_ms, write_section

sys.path.insert(0, str(ROOT))
from tests.onnx import controlflow_models as cm

RELERR_BUDGET = 0.05  # Silero VAD's mixed-precision row: output within 5% of FP32's (26 dB SQNR) on other frames
INTEGER = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def body_kernels(path: Path) -> dict[str, int]:
    """Kernels inside bodies after ONNX Runtime's optimizations: integer ones and float Conv/MatMul/Gemm."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = {"integer": 0, "float matrix": 0}

    def visit(graph: onnx.GraphProto, inside: bool) -> None:
        for node in graph.node:
            if inside and node.op_type.startswith(INTEGER):
                counts["integer"] += 1
            elif inside and node.op_type in ("Conv", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul"):
                counts["float matrix"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g, True)

    visit(onnx.load(str(path.with_suffix(".opt.onnx"))).graph, False)
    return counts


def _lowbit(src: Path, dst: Path, calib: list[dict], budget_on: list[dict] | None = None) -> dict:
    """lowbit's defaults; with ``budget_on`` (evaluation feeds), automatic mixed precision within
    :data:`RELERR_BUDGET` relative error of the output."""
    from lowbit.data import InputSpec, open_feeds
    from lowbit.onnx import Budget, Options, quantize
    from lowbit.onnx.metrics import OutputMetric
    from lowbit.onnx.model import input_specs, load_model

    budget = None
    if budget_on is not None:
        inputs = tuple(InputSpec(*s) for s in input_specs(load_model(src)))
        budget = Budget(OutputMetric("relerr", open_feeds(budget_on, inputs).batches(1)), RELERR_BUDGET)
    result = quantize(src, dst, calib, "int8", budget=budget, options=Options(compare=False, progress=False))
    kept = {"kept_float": result.mixed.kept} if result.mixed is not None else {}
    return {"layers": result.layers, "warnings": result.warnings, **kept}


def _ort(src: Path, dst: Path, calib: list[dict]) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calib)

        def get_next(self):
            return next(self.feeds, None)

    try:
        quantize_static(str(src), str(dst), Reader(), activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True)  # fmt: skip
    except Exception as exc:  # a peer's failure is a result
        return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    return {}


def _compare(src: Path, dst: Path, test: list[dict]) -> dict:
    a, b = _session(src), _session(dst)
    ref = [a.run(None, f)[0] for f in test]
    out = [b.run(None, f)[0] for f in test]
    r, o = np.concatenate([x.reshape(-1) for x in ref]), np.concatenate([x.reshape(-1) for x in out])
    return {"relative_error": float(np.linalg.norm(r - o) / np.linalg.norm(r)), "max_abs": float(np.abs(r - o).max())}


def _feeds(kind: str, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    if kind == "If (2 + 1 Conv)":
        return [{"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32), "wide": np.array(i % 2 == 0)}
                for i in range(count)]  # fmt: skip
    if kind == "Loop (MatMul, 3 steps)":
        return [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(count)]
    return [{"seq": rng.standard_normal((8, 5, 8)).astype(np.float32)} for _ in range(count)]


def frames(count: int, seed: int) -> list[dict]:
    """Synthetic 16 kHz frames of 576 samples (64 of context + 512), one per feed, with a zero LSTM state."""
    rng = np.random.default_rng(seed)
    t = np.arange(576) / 16000
    out = []
    for _ in range(count):
        f0 = rng.uniform(80, 300)
        voiced = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 8))
        signal = voiced * rng.uniform(0.05, 0.5) * (rng.random() < 0.6) + rng.standard_normal(576) * rng.uniform(
            1e-3, 0.05
        )
        out.append({"input": signal[None].astype(np.float32), "state": np.zeros((2, 1, 128), np.float32),
                    "sr": np.array(16000, np.int64)})  # fmt: skip
    return out


def silero_path() -> Path | None:
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    return path if path.is_file() else None


def _latency_ms(path: Path, feed: dict) -> float:
    return median_ms(_session(path), feed, runs=200, warmup=20)


def bench(name: str, src: Path, calib: list[dict], test: list[dict], work: Path, budget_on=None) -> dict:
    rows: dict[str, dict] = {}
    runs = [("lowbit", _lowbit), ("ORT quantize_static", _ort)]
    if budget_on is not None:
        runs.insert(
            1, (f"lowbit --metric relerr --max-drop {RELERR_BUDGET}", lambda s, d, c: _lowbit(s, d, c, budget_on))
        )
    for label, run in runs:
        dst = work / f"{src.stem}_{label.split()[0]}{'_budget' if 'max-drop' in label else ''}.onnx"
        row = run(src, dst, calib)
        if "error" not in row:
            row.update(body_kernels(dst))
            row.update(_compare(src, dst, test))
            row["latency_ms_b1"] = _latency_ms(dst, test[0])
        rows[label] = row
    rows["FP32"] = {**body_kernels(src), "latency_ms_b1": _latency_ms(src, test[0])}
    return rows


def run(quick: bool) -> dict:
    results = {"machine": machine(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="lowbit-controlflow-") as tmp:
        work = Path(tmp)
        for name, build in (("If (2 + 1 Conv)", cm.if_model), ("Loop (MatMul, 3 steps)", cm.loop_model),
                            ("Scan (2 MatMul, 5 steps)", cm.scan_model)):  # fmt: skip
            src = work / f"{build.__name__}.onnx"
            onnx.save(build(), str(src))
            results["models"][name] = bench(name, src, _feeds(name, 16, 1), _feeds(name, 8, 2), work)
        path = silero_path()
        if path is None:
            results["models"]["Silero VAD v5"] = {"missing": "pip install --no-deps silero-vad"}
        else:
            count = (64, 64) if quick else (256, 256)
            calib, test, budget_on = frames(count[0], 1), frames(count[1], 2), frames(64, 3)
            results["models"]["Silero VAD v5"] = bench("silero", path, calib, test, work, budget_on)
            probs = {}
            for label in ("FP32", "lowbit"):
                file = path if label == "FP32" else work / "silero_vad_lowbit.onnx"
                sess = _session(file)
                probs[label] = np.array([sess.run(None, f)[0].item() for f in frames(count[1], 2)])
            agree = float(((probs["FP32"] > 0.5) == (probs["lowbit"] > 0.5)).mean())
            results["models"]["Silero VAD v5"]["lowbit"]["decision_agreement"] = agree
    return results


def render(results: dict) -> str:
    from lowbit._table import format_table

    rows = []
    for model, r in results["models"].items():
        if "missing" in r:
            rows.append([model, "not installed: " + r["missing"], "", "", "", "", ""])
            continue
        for label, x in sorted(r.items(), key=lambda kv: kv[0] != "FP32"):
            if "error" in x:
                rows.append([model, label, "failed: " + x["error"][:60], "", "", "", ""])
                continue
            rows.append([
                model, label, str(x["integer"]), str(x["float matrix"]),
                "-" if "relative_error" not in x else f"{x['relative_error'] * 100:.2f}%",
                "-" if "max_abs" not in x else f"{x['max_abs']:.4f}", f"{x['latency_ms_b1']:.3f}",
            ])  # fmt: skip
    head = ["model", "quantizer", "integer kernels in bodies", "float Conv/MatMul in bodies", "rel. error",
            "max abs err", "ms b=1"]  # fmt: skip
    m = results["machine"]
    silero = results["models"].get("Silero VAD v5", {}).get("lowbit", {})
    lines = [
        "## Control flow: compute inside If, Loop and Scan", "",
        f"`python benchmarks/controlflow_bench.py` ({m['date']}; {m['cpu']}, {m['cores']} cores, ONNX Runtime "
        f"{m['onnxruntime']}). Kernels counted in ONNX Runtime's optimized graph; errors of the whole output "
        "against FP32 on held-out feeds. Silero VAD on synthetic frames (no speech recordings install offline).",
        "", "```", format_table(head, rows, "llrrrrr"), "```", "",
    ]  # fmt: skip
    if "decision_agreement" in silero:
        lines += [f"Silero VAD: speech/no-speech decisions (probability > 0.5) agree with FP32's on "
                  f"{silero['decision_agreement'] * 100:.1f}% of the held-out frames; "
                  + "; ".join(silero.get("warnings", [])) + ".", ""]  # fmt: skip
    budget = next((v for k, v in results["models"].get("Silero VAD v5", {}).items() if "max-drop" in k), None)
    if budget and "kept_float" in budget:
        kept = ", ".join(f"`{name.split('__')[-1]}`" for name in budget["kept_float"])
        lines += [f"With `--metric relerr --max-drop {RELERR_BUDGET}` (measured on 64 other frames) lowbit keeps "
                  f"{kept} of the 16 kHz branch in float.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer Silero VAD frames")
    args = parser.parse_args()
    results = run(args.quick)
    text = render(results)
    write_section("controlflow", text, results)
    print(text)


if __name__ == "__main__":
    main()
