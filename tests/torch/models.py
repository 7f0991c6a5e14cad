"""Small PyTorch models built in code for the tests."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.torch import Add, quantizers


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 2 - 1)
    return model


def convnet(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU, depthwise Conv-BN-ReLU6, pooling, Linear."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    return _randomize_bn(m, seed).eval()


def batches(n: int = 4, batch: int = 8, shape=(3, 16, 16), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for _ in range(n)]


class MLP(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SharedConvOutput(nn.Module):
    """A convolution whose output is read by its BatchNorm and by the Add after it: folding would be wrong."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        _randomize_bn(self)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ResBlock(nn.Module):
    """A ResNet basic block with a downsampling shortcut (two independent conv branches), then a MobileNetV2-style
    ``x + f(x)``, then an addition of two shape numbers (not a residual)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(3, 8, 1, stride=2)
        self.expand = nn.Conv2d(8, 8, 1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        out = self.conv2(torch.relu(self.conv1(x)))
        out = torch.relu(out + self.down(x))
        out = out + self.expand(out)
        out = out + self.scale  # a parameter: not a residual
        n = out.shape[2] + out.shape[3]  # numbers: not a residual
        return self.fc(out.mean((2, 3)) * (n / n))


class ExplicitAdd(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.add = Add()

    def forward(self, x):
        return self.add(self.conv(x), x)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.conv(x) + x
        return x


class Tagger(nn.Module):
    """An LSTM (two layers, bidirectional, batch first) and a Linear over its outputs."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lstm = nn.LSTM(12, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


def fit(model: nn.Module, data, target, opt, epochs: int) -> tuple[float, float]:
    """Train ``model`` for ``epochs`` passes of cross-entropy over the batches ``data`` and labels ``target``; returns
    its summed loss in eval mode before and after (it is left in eval mode)."""

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return sum(nn.functional.cross_entropy(model(x), t).item() for x, t in zip(data, target, strict=True))

    start = loss()
    model.train()
    for _ in range(epochs):
        for x, t in zip(data, target, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), t).backward()
            opt.step()
    return start, loss()


class FreshResNet(nn.Module):
    """Conv-BN-ReLU, a residual block (two Conv-BN, ReLU after the add), global average pooling, Linear; freshly
    initialised: its BatchNorms' running statistics are still at their init values (mean 0, variance 1), far from
    the batch statistics, so eval-mode and train-mode activations differ by a wide margin."""

    def __init__(self, seed: int = 0, channels: int = 8, classes: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        c = channels
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(x))))))
        return self.fc(x.mean((2, 3)))


def smooth_images(n: int, c: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are correlated, as real ones are: where GPTQ and AdaRound have
    something to exploit."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, size, size, generator=g).cumsum(-1).cumsum(-2) / size
    return base + 0.3 * torch.randn(n, c, size, size, generator=g)


def rounding_net() -> nn.Module:
    """Conv, grouped Conv, pointwise Conv, Linear: a layer of each kind the weight roundings round."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(24, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


def weight_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """The integer codes a weight rounding stored, by quantizer name (nearest rounding stores none)."""
    return {n: q.codes.clone() for n, q in quantizers(model).items() if q.has_codes}


def roundable_geometries() -> dict[str, nn.Module]:
    """A layer of every geometry the weight roundings handle, by a short name."""
    torch.manual_seed(0)
    return {
        "strided-grouped": nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        "dilated": nn.Conv2d(4, 6, (1, 3), padding=(0, 1), dilation=(1, 2)),
        "same-depthwise": nn.Conv2d(4, 4, 3, padding="same", groups=4),
        "pointwise": nn.Conv2d(4, 6, 1),
        "conv1d": nn.Conv1d(4, 6, 3, stride=2, padding=1),
        "valid-even": nn.Conv2d(4, 6, 2, padding="valid"),
        "linear": nn.Linear(4, 6),
    }


def layer_input(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    """A random input for one of :func:`roundable_geometries`."""
    shape = {nn.Linear: (5, 7, 4), nn.Conv1d: (3, 4, 11)}.get(type(layer), (3, 4, 9, 10))
    return torch.randn(*shape, generator=generator)
