"""Model definitions the benchmarks build without torch (torchvision does not load here)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def const(self, kind: str, array: np.ndarray) -> str:
        name = self.name(kind)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        """Conv (He-initialised, no bias) + BatchNormalization with plausible statistics [+ Relu]."""
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        conv = self.name("conv")
        self.nodes.append(
            helper.make_node(
                "Conv", [x, self.const("w", w)], [conv], conv, kernel_shape=[k, k], strides=[stride] * 2,
                pads=[k // 2] * 4,
            )
        )  # fmt: skip
        bn = self.name("bn")
        params = [
            self.const("gamma", self.rng.uniform(0.5, 1.0, cout)),
            self.const("beta", self.rng.uniform(-0.1, 0.1, cout)),
            self.const("mean", self.rng.uniform(-0.1, 0.1, cout)),
            self.const("var", self.rng.uniform(0.5, 1.5, cout)),
        ]
        self.nodes.append(helper.make_node("BatchNormalization", [conv, *params], [bn], bn))
        return self.relu(bn) if relu else bn

    def relu(self, x: str) -> str:
        out = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [out], out))
        return out


def resnet18(seed: int = 0, num_classes: int = 1000, size: int = 224) -> onnx.ModelProto:
    """ResNet-18 (He et al. 2016; BasicBlock [2, 2, 2, 2]) with seeded random weights and BatchNormalization
    nodes left in, so that the quantizer's preprocessing has to fold them. Input ``input`` (N, 3, size, size)."""
    b = _Builder(seed)
    x = b.conv_bn("input", 3, 64, 7, 2, relu=True)
    pool = b.name("maxpool")
    b.nodes.append(helper.make_node("MaxPool", [x], [pool], pool, kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = pool, 64
    for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
        y = b.conv_bn(x, cin, cout, 3, stride, relu=True)
        y = b.conv_bn(y, cout, cout, 3, 1, relu=False)
        skip = x if stride == 1 and cin == cout else b.conv_bn(x, cin, cout, 1, stride, relu=False)
        add = b.name("add")
        b.nodes.append(helper.make_node("Add", [y, skip], [add], add))
        x, cin = b.relu(add), cout
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], "gap"))
    b.nodes.append(helper.make_node("Flatten", ["gap"], ["features"], "flatten"))
    fc_w = b.const("fc_w", b.rng.standard_normal((num_classes, 512)) * np.sqrt(1.0 / 512))
    fc_b = b.const("fc_b", np.zeros(num_classes))
    b.nodes.append(helper.make_node("Gemm", ["features", fc_w, fc_b], ["logits"], "fc", transB=1))
    graph = helper.make_graph(
        b.nodes,
        "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lowbit.benchmarks")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
