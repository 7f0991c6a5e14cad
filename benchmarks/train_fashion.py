"""Train the two Fashion-MNIST reference models of the PyTorch benchmark, seeded, and write their weights to
benchmarks/weights/ (committed: the benchmark reads them and never trains the FP32 models itself).

    apt-get install dataset-fashion-mnist
    pip install torch==2.13.0
    python benchmarks/train_fashion.py            # both models (~20 min on 2 cores)
    python benchmarks/train_fashion.py cnn        # one

Models (benchmarks/torch_models.py): FashionCNN (plain Conv-BN-ReLU, max pools, two FC layers) and
FashionMobileNet (MobileNetV2-style: depthwise convs, ReLU6, residual adds). Trained on the 60,000 training
images (random horizontal flips and shifts of up to 2 pixels), SGD with Nesterov momentum, a one-cycle learning
rate, label smoothing 0.1; top-1 printed on the 10,000 test images, which training never sees.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lowbit._io import atomic_open
from lowbit.examples import fashion_mnist
from torch_models import FASHION_MODELS, WEIGHTS

RECIPES = {"cnn": {"epochs": 5, "lr": 0.1}, "mobilenet": {"epochs": 8, "lr": 0.2}}
BATCH = 128


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (per image) and one random shift of up to 2 pixels (per batch)."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    background = float(x.amin())  # the normalised value of a black pixel
    padded = F.pad(x, (2, 2, 2, 2), value=background)
    return padded[:, :, 2 + dy : 30 + dy, 2 + dx : 30 + dx]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``x``, run on the device of its parameters."""
    model.eval()
    device = _device(model)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(torch.from_numpy(x[i : i + batch]).to(device))
            correct += int((out.argmax(1).cpu().numpy() == y[i : i + batch]).sum())
    return correct / len(x)


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: float,
    lr: float,
    seed: int = 0,
    weight_decay: float = 5e-4,
    desc: str = "training",
    schedule: str = "onecycle",
    teacher: nn.Module | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``(x, y)`` for ``epochs`` (a fraction trains part of the last epoch) with SGD
    (Nesterov momentum 0.9) and a one-cycle ("onecycle") or cosine-decay ("cosine", for fine-tuning) learning
    rate peaking at ``lr``. With a ``teacher`` (QAT from the float model), half of the loss is the KL divergence
    to the teacher's predictions (distillation). Seeded: the same seed gives the same batches and augmentations.
    It runs on the device of ``model``'s parameters (the teacher's must be the same)."""
    device = _device(model)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(x) // BATCH
    total = max(1, round(epochs * steps_per_epoch))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1 and p.requires_grad]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.25)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    step = 0
    with tqdm(total=total, desc=desc, unit="step") as bar:
        while step < total:
            order = torch.randperm(len(x), generator=gen)
            for i in range(steps_per_epoch):
                if step == total:
                    break
                idx = order[i * BATCH : (i + 1) * BATCH]
                batch = augment(xt[idx], gen).to(device)
                logits = model(batch)
                loss = F.cross_entropy(logits, yt[idx].to(device), label_smoothing=0.1)
                if teacher is not None:
                    with torch.no_grad():
                        target = F.log_softmax(teacher(batch), dim=1)
                    kl = F.kl_div(F.log_softmax(logits, dim=1), target, log_target=True, reduction="batchmean")
                    loss = 0.5 * loss + 0.5 * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def save_weights(model: nn.Module, path: Path) -> None:
    """``model``'s state dict to ``path``, written atomically."""
    with atomic_open(path, "wb") as f:
        torch.save(model.state_dict(), f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help=f"which to train: {', '.join(FASHION_MODELS)} (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in FASHION_MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; models: {', '.join(FASHION_MODELS)}")
    args.models = args.models or list(FASHION_MODELS)
    x, y = fashion_mnist("train")
    xt, yt = fashion_mnist("test")
    for name in args.models:
        torch.manual_seed(args.seed)
        model = FASHION_MODELS[name]()
        t0 = time.perf_counter()
        train(model, x, y, **RECIPES[name], seed=args.seed, desc=name)
        top1 = evaluate(model, xt, yt)
        path = WEIGHTS / f"fashion_{name}.pt"
        save_weights(model, path)
        print(f"{name}: test top-1 {top1 * 100:.2f}% after {time.perf_counter() - t0:.0f} s -> {path}")


if __name__ == "__main__":
    main()
