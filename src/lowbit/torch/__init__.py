"""The PyTorch front end: quantized layers, PTQ (static and dynamic), QAT, Conv+BN folding, ONNX Q/DQ export.

    import lowbit.torch as lt
    qmodel = lt.quantize(model, "int8", calib=[x for x, _ in loader])
    lt.export_onnx(qmodel, example, "model_int8.onnx")

Refinements after calibration: ``Config(refine="easyquant")`` (or :func:`easyquant` on a calibrated model) searches
the scales layer by layer (:mod:`lowbit.torch.easyquant`); ``rounding="gptq"``/``"adaround"`` choose weight codes;
``rounding="awq"`` scales Linear inputs first (AWQ), and ``Config(smoothquant=0.5)`` smooths activation outliers
into the weights before calibration (SmoothQuant).

Needs ``torch`` (``pip install torch==2.13.0`` for the CPU build, then ``pip install "lowbit[torch]"``).
"""

try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lowbit.torch needs PyTorch: pip install torch==2.13.0 (the CPU build), or see https://pytorch.org"
    ) from exc

from lowbit.recipe import PRESETS, Config, LayerConfig, QuantizerConfig, preset
from lowbit.torch.distributed import ddp, shard
from lowbit.torch.easyquant import easyquant
from lowbit.torch.export import export_onnx
from lowbit.torch.fold import fold_batchnorm
from lowbit.torch.layers import (
    MODULE_MAP,
    Add,
    QuantAdd,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose2d,
    QuantLinear,
)
from lowbit.torch.ptq import calibrate, quantize, quantizers
from lowbit.torch.qat import QuantConvBn1d, QuantConvBn2d, QuantConvBn3d, batch_statistics, freeze_bn_stats
from lowbit.torch.quantizer import ClippingWarning, TensorQuantizer, fake_quant
from lowbit.torch.residual import trace_residual_adds
from lowbit.torch.rounding.adaround import adaround
from lowbit.torch.rounding.awq import awq
from lowbit.torch.rounding.gptq import gptq
from lowbit.torch.sensitivity import analyze, apply_mixed, mixed_config
from lowbit.torch.size import packed_weight_bytes
from lowbit.torch.smoothing import SmoothedLinear, smoothquant

__all__ = [
    "MODULE_MAP",
    "PRESETS",
    "Add",
    "ClippingWarning",
    "Config",
    "LayerConfig",
    "QuantAdd",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvBn1d",
    "QuantConvBn2d",
    "QuantConvBn3d",
    "QuantConvTranspose2d",
    "QuantLinear",
    "QuantizerConfig",
    "SmoothedLinear",
    "TensorQuantizer",
    "adaround",
    "analyze",
    "apply_mixed",
    "awq",
    "batch_statistics",
    "calibrate",
    "ddp",
    "easyquant",
    "export_onnx",
    "fake_quant",
    "fold_batchnorm",
    "freeze_bn_stats",
    "gptq",
    "mixed_config",
    "packed_weight_bytes",
    "preset",
    "quantize",
    "quantizers",
    "shard",
    "smoothquant",
    "trace_residual_adds",
]
