"""``ort``: ONNX Runtime's integer CPU kernels (QLinearConv, QGemm, QLinearAdd, ...).

uint8 asymmetric activations (the fastest u8s8 kernels), int8 per-channel weights, int32 biases, Q/DQ on the
inputs and outputs of every op ORT runs on integers where the integer domain pays, embedding tables as int8,
hard-swish and hard-sigmoid as the QLinearAdd and QLinearMul they can be (ORT has no integer kernel for them).
"""

from lowbit.core import QuantSpec
from lowbit.recipe.target import Target, register_target

ORT = register_target(
    Target(
        name="ort",
        summary="ONNX Runtime's integer CPU kernels (uint8 activations, int32 biases)",
        runtime="ONNX Runtime's integer CPU kernels",
        activation=QuantSpec(signed=False, symmetric=False),
        placement="integer-islands",
        int32_biases=True,
        int8_tables=True,
        integer_activations=True,
        weight_only="matmulnbits",
    )
)
