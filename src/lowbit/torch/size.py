"""The size a quantized model's weights take when each format is packed densely, beside its float parameters.

    codes  = sum over quantized weights of  numel * packed_bits / 8     (Format.packed_bits: int b -> b bits,
             binary 1, ternary 2, log2 b)
    scales = 4 bytes per scale (float32), zero points left out (weights are symmetric)
    float  = 4 bytes per parameter left in float (biases, BatchNorm, weights kept float)

An ONNX file stores binary, ternary, 2-bit and log2 codes one per byte (int8), so it is larger than ``total``;
benchmarks report both.

>>> packed_weight_bytes(qmodel)["total"]  # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

from lowbit.core import formats
from lowbit.torch.quantizer import TensorQuantizer


def _quantized_weights(model: nn.Module):
    for m in model.modules():
        if isinstance(getattr(m, "weight_quantizer", None), TensorQuantizer):
            yield m.weight, m.weight_quantizer
        for pname, q in getattr(m, "weight_quantizers", {}).items():
            yield getattr(m, pname), q


def packed_weight_bytes(model: nn.Module) -> dict[str, float]:
    """Bytes by kind: ``codes``, ``scales``, ``float``, ``total``, and the codes of each format (``binary``,
    ``int8``, ``ternary``, ``log2_4``, ...)."""
    out: dict[str, float] = {"codes": 0.0, "scales": 0.0, "float": 0.0}
    counted: set[int] = set()
    for weight, q in _quantized_weights(model):
        if q.mode != "quantize" or q.dynamic:
            continue
        counted.add(id(weight))
        counted.add(id(q.scale))
        codes = weight.numel() * formats.get(q.spec.format).packed_bits(q.spec) / 8
        out["codes"] += codes
        out[formats.label(q.spec)] = out.get(formats.label(q.spec), 0.0) + codes
        out["scales"] += 4 * q.scale.numel()
    quantizer_params = {id(p) for q in model.modules() if isinstance(q, TensorQuantizer) for p in q.parameters()}
    for p in model.parameters():  # a learned scale (or its exponent) is a scale, counted above, not a float weight
        if id(p) not in counted and id(p) not in quantizer_params:
            out["float"] += 4 * p.numel()
    out["total"] = out["codes"] + out["scales"] + out["float"]
    return out
