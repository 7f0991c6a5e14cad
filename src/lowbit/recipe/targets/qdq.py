"""``qdq``: plain Q/DQ for runtimes that fuse them themselves (OpenVINO, NPU toolchains, TVM, ...).

int8 symmetric activations and weights (per channel), a Q/DQ pair on every activation input of every
quantizable compute and elementwise op (Conv, ConvTranspose, Gemm, MatMul, Add, Mul, Concat, average pooling),
nothing on outputs, float biases: the runtime decides what it fuses. The worked example of adding a target
(docs/EXTENDING.md): this file plus its planner, ``every-op`` in :mod:`lowbit.onnx.placement`.
"""

from lowbit.core import QuantSpec
from lowbit.recipe.target import Target, register_target

QDQ = register_target(
    Target(
        name="qdq",
        summary="plain int8 symmetric Q/DQ on the inputs of every quantizable op (OpenVINO, NPU toolchains)",
        runtime="a runtime that fuses Q/DQ itself (OpenVINO, an NPU toolchain)",
        activation=QuantSpec(),
        placement="every-op",
        fixed_activation=True,
        timed_on_ort=False,
        float8=True,
    )
)
