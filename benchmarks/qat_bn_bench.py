"""QAT from a model whose BatchNorm statistics are not converged, against one whose are (issue 23).

    apt-get install dataset-fashion-mnist
    python benchmarks/qat_bn_bench.py              # ~10 min on 2 cores (3 seeds)
    python benchmarks/qat_bn_bench.py --no-write   # print only
    python benchmarks/qat_bn_bench.py --seeds 1 --steps 50 --test-images 2000 --threads 1   # the --quick run

Writes the "qat-bn" section of docs/BENCHMARKS.md and docs/benchmarks/qat-bn.json.

The model: a small residual CNN (Conv-BN-ReLU, max pool, a residual block, a strided Conv-BN-ReLU, a residual block,
global average pooling, Linear), freshly initialised (seeded). Its BatchNorm running statistics are either left at
their init values (mean 0, variance 1: "not converged"), or converged: averaged over 50 batches of training images
run in train mode, the weights untouched. Each is quantized for QAT exactly as the bug report did,
``lt.quantize(model.eval(), "w4a4" [.with_learned_scales()], calib=8 batches, qat=True)``, then trained with Adam
(lr 1e-3, batches of 64 of a seeded subset of the training images). The activation ranges are calibrated on
inference's activations (``bn_stats="running"``) or on training's (``bn_stats="batch"``), and the weight ranges are
fixed at quantize time, moved with the BatchNorm fold factor, or follow the weights (see VARIANTS): lowbit before
the fix is running + fixed, since the fix batch + fold. Reported: the mean norm of the first convolution's weight
gradient over the steps and on how many steps it was non-zero, how far the first layer's weights moved
(``|w_end - w_start| / |w_start|``), the largest share of a layer's folded weight outside its range after
training, top-1 on the 10,000 test images (--test-images: the first N), and which quantizers warned that they clip
most of their input (``lt.ClippingWarning``). The float model trained the same way is the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit.torch as lt
from _common import machine, write_section
from lowbit._table import format_table
from lowbit.examples import fashion_mnist

CALIB_BATCHES = 8
BN_BATCHES = 50
# (activation ranges calibrated on "running" or "batch" BatchNorm statistics, weight ranges): "fixed" at quantize time
# (lowbit before the fix), moving with the BatchNorm "fold" factor (the default since), "follow"ing the weight's own
# range (TensorQuantizer.follow_weight), or the same with MSE-clipped weight ranges ("mse follow").
VARIANTS = (("running", "fixed"), ("batch", "fixed"), ("batch", "fold"), ("batch", "follow"), ("batch", "mse follow"))
BATCH = 64
LR = 1e-3


class ResCNN(nn.Module):
    """Conv-BN-ReLU (16), max pool, a residual block, Conv-BN-ReLU (32, stride 2), a residual block, global average
    pooling, Linear (10)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)

        def cb(cin, cout, stride=1):
            return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)

        self.conv1, self.bn1 = cb(1, 16)
        self.b1_conv1, self.b1_bn1 = cb(16, 16)
        self.b1_conv2, self.b1_bn2 = cb(16, 16)
        self.conv2, self.bn2 = cb(16, 32, stride=2)
        self.b2_conv1, self.b2_bn1 = cb(32, 32)
        self.b2_conv2, self.b2_bn2 = cb(32, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(x + self.b1_bn2(self.b1_conv2(torch.relu(self.b1_bn1(self.b1_conv1(x))))))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(x + self.b2_bn2(self.b2_conv2(torch.relu(self.b2_bn1(self.b2_conv1(x))))))
        return self.fc(x.mean((2, 3)))


def converge_bn(model: nn.Module, x: np.ndarray) -> nn.Module:
    """The BatchNorms' running statistics averaged over ``BN_BATCHES`` batches in train mode; weights untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad():
        for i in range(BN_BATCHES):
            model(torch.from_numpy(x[i * BATCH : (i + 1) * BATCH]))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            correct += int((model(torch.from_numpy(x[i : i + 1000])).argmax(1).numpy() == y[i : i + 1000]).sum())
    return correct / len(x)


def first_conv(model: nn.Module) -> nn.Module:
    return model.get_submodule("conv1")


def weights_clipped(model: nn.Module, x: torch.Tensor) -> float:
    """The largest share of a layer's (BatchNorm-folded) weight outside its quantizer's range, seen in one
    inference pass on ``x`` through forward hooks of the weight quantizers."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        q.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
        for n, q in lt.quantizers(model).items()
        if q.is_weight and q.mode == "quantize"
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    worst = 0.0
    for n, w in seen.items():
        q = model.get_submodule(n)
        shape = [-1] + [1] * (w.dim() - 1)
        s, z = q.scale.detach().clamp_min(1e-12).reshape(shape), q.zero_point.reshape(shape)
        codes = torch.round(w / s) + z
        worst = max(worst, float(((codes < q.spec.qmin) | (codes > q.spec.qmax)).float().mean()))
    return worst


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, seed: int) -> dict:
    """Adam over seeded batches; the first convolution's gradient norm on every step, its weights' relative move."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    w0 = first_conv(model).weight.detach().clone()
    norms = []
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", lt.ClippingWarning)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (BATCH,), generator=gen).numpy()
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
            norms.append(float(first_conv(model).weight.grad.norm()))
            opt.step()
    w = first_conv(model).weight.detach()
    clipping = [str(w.message).split(" clips ")[0].removeprefix("quantizer ").strip("'") for w in caught
                if issubclass(w.category, lt.ClippingWarning)]  # fmt: skip
    return {
        "grad_norm": float(np.mean(norms)),
        "steps_with_grad": int(sum(n > 0 for n in norms)),
        "steps": steps,
        "weight_change": float((w - w0).norm() / w0.norm()),
        "clipping_warnings": clipping,
        "weights_clipped": weights_clipped(model, torch.from_numpy(x[:BATCH])) if lt.quantizers(model) else 0.0,
    }


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    x, y = fashion_mnist("train")
    xt, yt = fashion_mnist("test")
    xt, yt = xt[: args.test_images], yt[: args.test_images]
    order = np.random.default_rng(args.seed).permutation(len(x))[: args.train_images]
    x, y = x[order], y[order]
    calib = [torch.from_numpy(x[i * BATCH : (i + 1) * BATCH]) for i in range(CALIB_BATCHES)]
    rows: dict[str, list[dict]] = {}

    def record(name: str, model: nn.Module, started: float, stats: dict) -> None:
        stats.update(top1=evaluate(model, xt, yt), seconds=time.perf_counter() - started)
        rows.setdefault(name, []).append(stats)
        print(
            f"{name:<52} grad {stats['grad_norm']:.3g} on {stats['steps_with_grad']}/{stats['steps']} steps, "
            f"first layer moved {stats['weight_change']:.3f}, weights clipped {stats['weights_clipped']:.0%}, "
            f"top-1 {stats['top1'] * 100:.2f}%, "
            f"{len(stats['clipping_warnings'])} clipping warning(s), {stats['seconds']:.0f} s",
            flush=True,
        )

    for seed in range(args.seed, args.seed + args.seeds):
        _run_seed(seed, x, y, calib, args.steps, record)
    return {
        "machine": machine(),
        "torch": torch.__version__,
        "settings": {
            "seeds": list(range(args.seed, args.seed + args.seeds)),
            "steps": args.steps,
            "batch": BATCH,
            "lr": LR,
            "train_images": args.train_images,
            "test_images": len(xt),
            "calibration_batches": CALIB_BATCHES,
            "bn_convergence_batches": BN_BATCHES,
            "threads": args.threads,
        },
        "rows": rows,
    }


def _config(learned: bool, weights: str) -> lt.Config:
    if learned:
        return lt.preset("w4a4").with_learned_scales()
    base = lt.preset("w4a4")
    if weights != "mse follow":
        return base
    return lt.Config(lt.LayerConfig(base.default.input, dataclasses.replace(base.default.weight, method="mse")))


def _set_weight_ranges(model: nn.Module, weights: str) -> None:
    """How the weight ranges move in training: not at all, with the BatchNorm fold (default), with the weight."""
    for m in model.modules():
        if isinstance(m, lt.QuantConvBn2d):
            m.follow_bn = weights != "fixed"
    for quantizer in lt.quantizers(model).values():
        quantizer.follow_weight = weights.endswith("follow")


def _run_seed(seed: int, x: np.ndarray, y: np.ndarray, calib: list, steps: int, record) -> None:
    """The float reference and the QAT runs, for the model and the batches of one seed."""
    started = time.perf_counter()
    model = ResCNN(seed)
    record("FP32 (reference)", model, started, train(model, x, y, steps, seed))
    for bn in ("not converged", "converged"):
        for learned in (False, True):
            # A learned weight scale neither follows nor moves with the fold: LSQ runs only before and after.
            variants = VARIANTS if not learned else (("running", "learned"), ("batch", "learned"))
            for bn_stats, weights in variants:
                started = time.perf_counter()
                model = ResCNN(seed)
                if bn == "converged":
                    converge_bn(model, x)
                q = lt.quantize(model.eval(), _config(learned, weights), calib=calib, qat=True, progress=False,
                                bn_stats=bn_stats)  # fmt: skip
                _set_weight_ranges(q, weights)
                stats = train(q, x, y, steps, seed)
                stats.update(bn=bn, learned_scales=learned, bn_stats=bn_stats, weights=weights, seed=seed)
                name = f"W4A4{' LSQ' if learned else ''}, BN {bn}, activations on {bn_stats} stats, weights {weights}"
                record(name, q, started, stats)


def _test_images(n: int) -> str:
    return "the 10,000 test images" if n >= 10000 else f"the first {n} of the 10,000 test images"


def render(results: dict) -> str:
    s = results["settings"]
    headers = [
        "run",
        "BN stats",
        "act. ranges on",
        "weights",
        "|grad conv1|",
        "steps with grad",
        "conv1 moved",
        "w clipped",
        "top-1 %",
        "per seed",
        "warned",
    ]
    table = []
    for runs in results["rows"].values():
        r = runs[0]
        run_name = "FP32" if "bn" not in r else ("W4A4 LSQ" if r["learned_scales"] else "W4A4")
        top1 = np.array([t["top1"] * 100 for t in runs])
        warned = ", ".join(dict.fromkeys(w for t in runs for w in t["clipping_warnings"])) or "-"
        table.append([
            run_name, r.get("bn", "-"), r.get("bn_stats", "-"), r.get("weights", "-"),
            f"{np.mean([t['grad_norm'] for t in runs]):.3g}",
            f"{min(t['steps_with_grad'] for t in runs)}/{r['steps']}",
            f"{np.mean([t['weight_change'] for t in runs]):.3f}", f"{max(t['weights_clipped'] for t in runs):.0%}",
            f"{top1.mean():.2f} ± {top1.std():.2f}", " ".join(f"{v:.1f}" for v in top1), warned,
        ])  # fmt: skip
    m = results["machine"]
    return "\n".join([
        "## QAT and BatchNorm statistics that have not converged",
        "",
        "`python benchmarks/qat_bn_bench.py` (issue 23). A freshly initialised residual CNN (Conv-BN-ReLU, two "
        "residual blocks, global pooling, Linear) on Fashion-MNIST, quantized W4A4 for QAT "
        "(`lt.quantize(model.eval(), cfg, calib=..., qat=True)`, BatchNorm kept training) with its BatchNorm running "
        f"statistics at their init values (\"not converged\") or averaged over {s['bn_convergence_batches']} training "
        "batches (\"converged\", same weights), then trained from scratch: Adam, lr "
        f"{s['lr']}, {s['steps']} steps of {s['batch']} images from {s['train_images']} training images; top-1 on "
        f"{_test_images(s.get('test_images', 10000))}, mean ± standard deviation over {len(s['seeds'])} seeds "
        "(model, batches; "
        "'per seed' lists them). act. ranges on: the activation ranges calibrated on inference's activations "
        "(\"running\" BatchNorm statistics, `bn_stats=\"running\"`) or on training's (\"batch\", the QAT default "
        "now); weights: the weight ranges fixed at quantize time (\"fixed\", `QuantConvBn2d.follow_bn=False`), "
        "moved in training with each channel's BatchNorm fold factor gamma / sqrt(running_var + eps) (\"fold\", "
        "the default now), following the weight's own range (\"follow\", `TensorQuantizer.follow_weight=True`), the "
        "same with MSE-clipped weight ranges (\"mse follow\", weight `method=\"mse\"`), or learned (LSQ). Lowbit "
        "before the fix: running + fixed; since: batch + fold. "
        "|grad conv1|: the mean norm of the first convolution's weight "
        "gradient (mean over seeds; steps with grad: the fewest); conv1 moved: |w_end - w_start| / |w_start|; "
        "w clipped: after training, the largest share of a "
        "layer's (BatchNorm-folded) weight outside its weight quantizer's range; warned: the quantizers that "
        "warned that they clip most of their input (`lt.ClippingWarning`).",
        "",
        "```",
        format_table(headers, table, align="llllrrrrrll"),
        "```",
        "",
        f"{m['cpu']}, {s['threads']} threads, torch {results['torch']}, {m['date']}.",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--train-images", type=int, default=12000, help="the training subset (default 12000)")
    parser.add_argument(
        "--test-images", type=int, default=10000, help="top-1 on the first N test images (default all 10000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds, from --seed on (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    results = run(args)
    text = render(results)
    print(text)
    if not args.no_write:
        write_section("qat-bn", text, results)


if __name__ == "__main__":
    main()
