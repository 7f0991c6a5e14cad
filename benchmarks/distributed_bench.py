"""lowbit.torch on torch.distributed (torchrun, gloo, CPU): calibration on 2 ranks against 1 process, and W4A4 QAT
under DistributedDataParallel against 1 process with the same global batch and seed (issue 29).

    apt-get install dataset-fashion-mnist && pip install torch==2.13.0
    python benchmarks/distributed_bench.py                  # 1,024 calibration images, QAT 1 epoch
    python benchmarks/distributed_bench.py --epochs 0.25    # a shorter QAT
    python benchmarks/distributed_bench.py --quick          # 256 images, QAT 0.01 epoch: a smoke run

Model: the Fashion-MNIST FashionMobileNet (MobileNetV2-style, benchmarks/torch_models.py, committed weights).
Calibration: the int8 preset with each method (minmax, percentile, entropy, mse), on 1,024 training images in
batches of 64; with 2 ranks each calibrates on its half (lt.shard) and lowbit merges the statistics
(lowbit.torch.distributed). Every activation scale is compared bit for bit with one process's on all 1,024.
Each process gets cores / ranks threads. QAT: W4A4 with learned scales, 1,000 calibration images, SGD (Nesterov),
cosine learning rate from 0.01, global batch 128 (64 per rank on 2 ranks), seeded batch order and augmentation,
BatchNorm as DDP does it: on CPU each rank normalises with the statistics of its own 64 samples (nn.SyncBatchNorm,
which would share the global batch's, runs on GPUs only), so 2 ranks are not exactly 1 process here.

Writes the "distributed" section of docs/BENCHMARKS.md and docs/benchmarks/distributed.json (not with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit.torch as lt
from _common import machine, status_mb, write_section
from lowbit._table import format_table
from lowbit.examples import fashion_mnist
from torch_models import pretrained_fashion
from train_fashion import BATCH, augment, evaluate

METHODS = ("minmax", "percentile", "entropy", "mse")
HEADERS = ["method", "activation scales identical, 2 ranks vs 1", "seconds, 1 process", "seconds, 2 ranks"]


def _calibration_batches(images: int) -> list[torch.Tensor]:
    x, _ = fashion_mnist("train")
    pick = np.random.default_rng(0).choice(len(x), images, replace=False)
    return [torch.from_numpy(x[pick[i : i + 64]]) for i in range(0, images, 64)]


def worker_calibrate(out: Path, images: int) -> None:
    """One rank (or the one process): quantize with each method on this rank's shard; save scales and times."""
    data = list(lt.shard(_calibration_batches(images)))
    result: dict[str, np.ndarray] = {}
    for method in METHODS:
        t0 = time.perf_counter()
        q = lt.quantize(pretrained_fashion("mobilenet"), lt.preset("int8").with_method(method), calib=data,
                        progress=False)  # fmt: skip
        result[f"seconds/{method}"] = np.array(time.perf_counter() - t0)
        for name, qz in lt.quantizers(q).items():
            if not qz.is_weight:
                result[f"{method}/{name}"] = qz.scale.detach().numpy()
    result["peak_mb"] = np.array(status_mb("VmHWM") or 0.0)
    np.savez(out / f"calib_rank{dist.get_rank() if dist.is_initialized() else 0}.npz", **result)


def worker_qat(out: Path, epochs: float) -> None:
    """W4A4 QAT of FashionMobileNet; on several ranks each takes its slice of every global batch (DDP)."""
    size, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    x, y = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    model = pretrained_fashion("mobilenet")
    calib = _calibration_batches(1024)[:16]
    t0 = time.perf_counter()
    q = lt.quantize(model, lt.preset("w4a4").with_learned_scales(), calib=list(lt.shard(calib)), qat=True,
                    progress=False)  # fmt: skip
    net = lt.ddp(q) if size > 1 else q
    decay = [p for p in net.parameters() if p.ndim > 1 and p.requires_grad]
    rest = [p for p in net.parameters() if p.ndim <= 1 and p.requires_grad]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
                          lr=0.01, momentum=0.9, nesterov=True)  # fmt: skip
    steps = max(1, round(epochs * (len(x) // BATCH)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    per = BATCH // size
    net.train()
    order = torch.randperm(len(x), generator=gen)
    for step in range(steps):
        if (step + 1) * BATCH > len(order):
            order = torch.randperm(len(x), generator=gen)
        idx = order[(step * BATCH) % len(order) :][:BATCH]
        batch = augment(xt[idx], gen)  # the whole global batch, so the generator stays in step on every rank
        mine = slice(rank * per, (rank + 1) * per)
        loss = F.cross_entropy(net(batch[mine]), yt[idx][mine], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if rank == 0 and step % 50 == 0:
            print(f"QAT {size} rank(s): step {step}/{steps} loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - t0
    if rank == 0:
        q.eval()
        top1 = evaluate(q, x_test, y_test)
        (out / f"qat_{size}.json").write_text(json.dumps({"top1": top1, "seconds": seconds, "steps": steps}))


def launch(args: list[str], ranks: int) -> float:
    """Run this script with ``args`` on ``ranks`` processes (torchrun for 2 or more); the wall time."""
    threads = max(1, (os.cpu_count() or 2) // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *launcher, str(Path(__file__).resolve()), *args], env=env, check=True)
    return time.perf_counter() - t0


def compare_calibration(work: Path) -> dict:
    one = dict(np.load(work / "calib1" / "calib_rank0.npz"))
    ranks = [dict(np.load(work / "calib2" / f"calib_rank{r}.npz")) for r in range(2)]
    out = {}
    for method in METHODS:
        names = [k for k in one if k.startswith(f"{method}/")]
        same = sum(all(np.array_equal(r[k], one[k]) for r in ranks) for k in names)
        out[method] = {
            "scales": len(names),
            "identical": same,
            "seconds_1": float(one[f"seconds/{method}"]),
            "seconds_2": max(float(r[f"seconds/{method}"]) for r in ranks),
        }
    out["peak_mb_1"] = float(one["peak_mb"])
    out["peak_mb_2"] = max(float(r["peak_mb"]) for r in ranks)
    return out


def render(results: dict) -> str:
    c = results["calibration"]
    rows = [[m, f"{c[m]['identical']}/{c[m]['scales']}", f"{c[m]['seconds_1']:.1f}", f"{c[m]['seconds_2']:.1f}"]
            for m in METHODS]  # fmt: skip
    q1, q2 = results["qat"]["1"], results["qat"]["2"]
    return "\n".join(
        [
            "## torch.distributed: calibration and QAT on 2 ranks",
            "",
            f"`python benchmarks/distributed_bench.py` (issue 29). FashionMobileNet; torchrun, gloo, CPU; each process "
            f"gets cores / ranks threads. Calibration on {results['images']:,} training images (int8 preset); with 2 "
            "ranks each calibrates on half (`lt.shard`) and the statistics merge (`lowbit.torch.distributed`).",
            "",
            "```",
            format_table(HEADERS, rows),
            "```",
            "",
            f"Peak resident memory per process: {c['peak_mb_1']:.0f} MB with 1 process, "
            f"{c['peak_mb_2']:.0f} MB per rank with 2 (each holds the model and its shard).",
            "",
            f"W4A4 QAT, learned scales, {q1['steps']} steps of a global batch of {BATCH} "
            f"({results['epochs']:g} epoch), the same seed: 1 process {100 * q1['top1']:.2f}% top-1 "
            f"({q1['seconds'] / 60:.1f} min), 2 DDP ranks (BatchNorm per rank) {100 * q2['top1']:.2f}% "
            f"({q2['seconds'] / 60:.1f} min).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=["calibrate", "qat"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        if "RANK" in os.environ:
            dist.init_process_group("gloo")
        (worker_calibrate if args.worker == "calibrate" else worker_qat)(
            args.out, args.images if args.worker == "calibrate" else args.epochs
        )
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    if args.quick:
        args.images, args.epochs = 256, 0.01
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for ranks in (1, 2):
            (work / f"calib{ranks}").mkdir()
            launch(["--worker", "calibrate", "--out", str(work / f"calib{ranks}"), "--images", str(args.images)],
                   ranks)  # fmt: skip
        calibration = compare_calibration(work)
        print(json.dumps(calibration, indent=1), flush=True)
        qat = {}
        for ranks in (1, 2):
            launch(["--worker", "qat", "--out", str(work), "--epochs", str(args.epochs)], ranks)
            qat[str(ranks)] = json.loads((work / f"qat_{ranks}.json").read_text())
        print(json.dumps(qat, indent=1), flush=True)
    results = {"machine": machine(), "images": args.images, "epochs": args.epochs, "calibration": calibration,
               "qat": qat}  # fmt: skip
    print(render(results))
    if not args.quick:
        write_section("distributed", render(results), results)


if __name__ == "__main__":
    main()
