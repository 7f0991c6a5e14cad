"""PyTorch model definitions the benchmarks need (torchvision does not load with the CPU torch build)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.examples import _package_dir, read_state_dict


class MNISTNet(nn.Module):
    """ccexam's MNISTNet: Conv32-ReLU-pool, Conv64-ReLU-pool, FC128-ReLU, FC10 (its state dict's key names)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def pretrained_mnistnet() -> MNISTNet:
    """MNISTNet with ccexam's pretrained weights (read without unpickling arbitrary code)."""
    state = read_state_dict(_package_dir("ccexam", "ccexam mlxtend") / "weights" / "mnist.pth")
    model = MNISTNet()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    return model.eval()
