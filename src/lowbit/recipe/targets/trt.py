"""``trt``: TensorRT's explicit quantization (TensorRT 8+).

int8 symmetric activations (zero point 0, the only kind TensorRT takes), int8 per-channel weights, Q/DQ on the
inputs of Conv/ConvTranspose/Gemm/MatMul and on the skip input of a residual Add, nothing on outputs: TensorRT
fuses the rest (Conv + bias + Add + Relu, the next Q). Biases stay float: TensorRT folds them itself.
"""

from lowbit.core import QuantSpec
from lowbit.recipe.target import Target, register_target

TRT = register_target(
    Target(
        name="trt",
        summary="TensorRT explicit INT8 (int8 symmetric, Q/DQ on compute inputs and residual skips)",
        runtime="TensorRT",
        activation=QuantSpec(),
        placement="compute-inputs",
        fixed_activation=True,
        timed_on_ort=False,
        float8=True,
        symmetric_weights=True,
    )
)
