"""What every benchmark shares: the machine's description and writing its section of docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Where the results go: docs/ (BENCHMARKS.md, benchmarks/*.json and plots), or the folder LOWBIT_BENCH_DOCS names
# (python -m benchmarks --quick writes its reduced runs there, away from the full figures).
DOCS = Path(os.environ.get("LOWBIT_BENCH_DOCS") or ROOT / "docs")
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def use_device(parser, device: str) -> str | None:
    """Check a benchmark's ``--device`` (cpu, cuda, cuda:N) and set torch up for it: on a GPU, plain float32
    matrix products (no TF32), so that it computes what the CPU computes. Returns the GPU's name (None for cpu)."""
    import torch

    if device == "cpu":
        return None
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        parser.error(f"--device {device}: this machine has no CUDA device that torch can use; use --device cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return torch.cuda.get_device_name(torch.device(device))


def status_mb(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now, VmHWM: its peak), in MB;
    None where there is no /proc (not Linux)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory() -> float | None:
    """Reset this process's peak resident memory (VmHWM) to what it holds now (Linux /proc/self/clear_refs);
    returns that, in MB, for :func:`status_mb` ("VmHWM") to be measured against."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return status_mb("VmRSS")


def median_ms(session, feed: dict, runs: int, warmup: int) -> float:
    """Median wall time (ms) of ``runs`` runs of an ONNX Runtime ``session`` on ``feed`` after ``warmup`` untimed
    ones: a model timed alone (several models timed against each other: lowbit.onnx.compare.interleaved_latency_ms)."""
    import time

    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def write_section(name: str, section: str, results: dict) -> None:
    """Replace the ``<!-- name:start -->`` .. ``<!-- name:end -->`` section of docs/BENCHMARKS.md (or append it)
    and write the raw figures to docs/benchmarks/<name>.json (under :data:`DOCS`)."""
    from lowbit._io import atomic_write_text

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    docs = DOCS
    (docs / "benchmarks").mkdir(parents=True, exist_ok=True)
    atomic_write_text(docs / "benchmarks" / f"{name}.json", json.dumps(results, indent=2) + "\n")
    path = docs / "BENCHMARKS.md"
    text = (
        path.read_text()
        if path.exists()
        else "# lowbit benchmarks\n\nEvery figure here comes from a script in `benchmarks/` that anyone can run.\n"
    )
    block = f"{start}\n{section.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)
