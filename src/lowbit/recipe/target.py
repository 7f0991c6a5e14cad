"""Targets: the runtimes a quantized model is laid out for, one registered :class:`Target` per file in
``lowbit/recipe/targets/``.

A target says how activations are stored, which calibration method suits it by default, where Q/DQ go (the name
of an ONNX placement planner, :data:`lowbit.onnx.placement.PLANNERS`), and what it stores besides (int32 biases,
int8 embedding tables). Nothing else in lowbit compares a target's name: code asks the target.

>>> get_target("trt").activation.symmetric, get_target("ort").activation.signed
(True, False)
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.core import QuantSpec
from lowbit.errors import SpecError


@dataclass(frozen=True)
class Target:
    """One runtime's rules (see the module doc).

    activation: how activations are stored when the recipe leaves it to the target (8-bit).
    placement: the ONNX planner that decides which tensors get Q/DQ (``lowbit.onnx.placement.PLANNERS``).
    default_method: the calibration method when the recipe names none. MSE searches the grid the target uses;
        TensorRT's entropy method, as NVIDIA's toolkits compute it, cuts spiky tensors hard (ccexam MNISTNet: 90.6%
        top-1 with it, 99.8% with mse, as FP32; re-measured once its zero bin followed NVIDIA's, which changed
        nothing there).
    fixed_activation: the runtime takes only ``activation`` (TensorRT: zero point 0); else any 8-bit grid.
    int32_biases: biases of the integer kernels are stored as int32 with scale ``s_x * s_w``.
    int8_tables: static quantization also stores embedding tables (a Gather on a constant) as int8.
    timed_on_ort: latency measured on ONNX Runtime's CPU means something for it (a TensorRT layout is not run
        as TensorRT would).
    integer_activations: activations that the runtime has no integer kernel for (HardSwish, HardSigmoid) are
        written as the integer ops it has (an Add whose quantizer clips, a Mul, a scale folded into a
        DequantizeLinear: ``lowbit.onnx.activations.lower``) where their input arrives as integers.
    float8: the layout also serves FP8 (FLOAT8 Q/DQ, ``--format fp8``): the runtime builds FP8 from explicit Q/DQ
        (TensorRT on Hopper). Not ``ort``: ONNX Runtime's CPU has no FP8 kernels, and its layout is made for
        its integer kernels (int32 biases, Relu absorbed by a zero point, integer elementwise ops).
    weight_only: how weight-only quantization (no activation quantizer) is written for the runtime:
        ``"matmulnbits"`` (ONNX Runtime's com.microsoft MatMulNBits kernel) or ``"dequantize"`` (blocked or
        per-channel DequantizeLinear on integer weights before the float MatMul, opset 21).
    symmetric_weights: the runtime takes symmetric weights only (TensorRT: zero point 0, INT4 too).
    """

    name: str
    summary: str
    runtime: str  # what the layout is for, in a few words ("TensorRT")
    activation: QuantSpec
    placement: str
    default_method: str = "mse"
    fixed_activation: bool = False
    int32_biases: bool = False
    int8_tables: bool = False
    timed_on_ort: bool = True
    integer_activations: bool = False
    float8: bool = False
    weight_only: str = "dequantize"
    symmetric_weights: bool = False

    def check_activation(self, spec: QuantSpec) -> None:
        """Refuse an activation grid this runtime cannot run."""
        if spec.bits != 8:
            raise SpecError(f"target {self.name!r} stores 8-bit activations, not {spec.bits}-bit")
        if self.fixed_activation and (spec.signed, spec.symmetric) != (
            self.activation.signed,
            self.activation.symmetric,
        ):
            kind = f"{'int8' if self.activation.signed else 'uint8'} {'symmetric' if self.activation.symmetric else ''}"
            raise SpecError(f"target {self.name!r} takes {kind.strip()} activations only")


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Make ``target`` known by its name (a second target of the same name is an error)."""
    if target.name in _TARGETS:
        raise SpecError(f"a target named {target.name!r} is registered already")
    _TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    """The target called ``name``; an unknown name is an error that lists the targets."""
    if not isinstance(name, str) or name not in _TARGETS:
        raise SpecError(f"unknown target {name!r}; targets: {', '.join(_TARGETS)}")
    return _TARGETS[name]


def available_targets() -> list[str]:
    """The names of the registered targets."""
    return list(_TARGETS)
