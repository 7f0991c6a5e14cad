"""Weight-only layouts of a quantized ``x @ W``: ONNX Runtime's ``MatMulNBits`` and blocked ``DequantizeLinear``.

The numbers are the same in both: ``W`` (K inputs x N outputs) is cut along K into blocks of ``block_size``
(the last one padded), each output channel's block has a scale ``s`` and a zero point ``z``, and

    W[k, n] ~ s[n, k // block_size] * (q[n, k] - z[n, k // block_size])

**MatMulNBits** (``com.microsoft``, as ONNX Runtime 1.32 defines it, checked against its kernel in
tests/onnx/test_weight_only_layout.py): inputs ``A``, ``B`` (uint8, ``[N, n_blocks, block_size * bits / 8]``:
codes of output channel n, block by block; at 4 bits two codes a byte, the even k in the low nibble), ``scales``
(``[N * n_blocks]``, A's float type), ``zero_points`` (uint8, each output channel's ``n_blocks`` codes packed as
B, the row padded to a whole byte; absent: ``2^(bits-1)``, 8 at 4 bits, 128 at 8 bits, which is symmetric
quantization), ``g_idx`` (not written: codes stay in natural column order) and ``bias`` (``[N]``); attributes
``K``, ``N``, ``bits``, ``block_size`` (a power of two, at least 16) and ``accuracy_level`` (the compute type of
``A``: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8; at 4 ONNX Runtime quantizes ``A`` to int8 per block at run time).
The padding codes of the last block are its zero point (they dequantize to 0).

**Blocked DequantizeLinear** (opset 21, for TensorRT's INT4 weight-only and plain Q/DQ runtimes): an int4
(symmetric) or uint4 (with zero points) initializer shaped like ``W`` (K, N), scales ``(n_blocks, N)``,
``axis=0``, ``block_size``; the last block is short, not padded. At 8 bits per output channel: int8 ``W``,
scales ``(N,)``, ``axis=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "com.microsoft"
MIN_BLOCK = 16  # MatMulNBits' smallest block; every block size is a power of two from here
BITS = (4, 8)  # the widths both layouts store (MatMulNBits also has 2; ONNX Q/DQ has int2 only from opset 25)


def check_block_size(block_size: int) -> None:
    """A ValueError unless ``block_size`` is a power of two of at least :data:`MIN_BLOCK`."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < MIN_BLOCK:
        raise ValueError(f"a block size is a power of two of at least {MIN_BLOCK}, got {block_size!r}")
    if block_size & (block_size - 1):
        raise ValueError(f"a block size is a power of two of at least {MIN_BLOCK}, got {block_size}")


@dataclass(frozen=True)
class Blocks:
    """A weight's codes in blocks along K: ``codes`` (N, K) unsigned, ``scale`` and ``zero_point`` (N, n_blocks);
    ``zero_point`` None: symmetric, the code ``2^(bits-1)`` is zero."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    block_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N) of the weight."""
        n, k = self.codes.shape
        return k, n

    @property
    def n_blocks(self) -> int:
        return -(-self.codes.shape[1] // self.block_size)

    def zero_points(self) -> np.ndarray:
        """(N, n_blocks) zero points as codes (``2^(bits-1)`` where symmetric)."""
        if self.zero_point is not None:
            return self.zero_point.astype(np.uint8)
        return np.full(self.scale.shape, 1 << (self.bits - 1), np.uint8)

    def dequantize(self) -> np.ndarray:
        """``W`` (K, N) as the layouts store it: ``s * (q - z)`` block by block (float32)."""
        k, _ = self.shape
        per_column = np.repeat(np.arange(self.n_blocks), self.block_size)[:k]
        z = self.zero_points().astype(np.float32)[:, per_column]
        return ((self.codes.astype(np.float32) - z) * self.scale.astype(np.float32)[:, per_column]).T


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``codes`` (rows, n) as bytes: at 8 bits as they are, at 4 bits two a byte, the even one in the low
    nibble (an odd ``n`` is padded with a 0 code)."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes.copy()
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), np.uint8)], axis=1)
    return (codes[:, 0::2] & 0xF) | ((codes[:, 1::2] & 0xF) << 4)


def matmulnbits_initializers(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(B, scales, zero_points)`` of MatMulNBits for ``blocks``: B ``[N, n_blocks, blob]`` with the last block
    padded by its zero point, scales ``[N * n_blocks]``, zero points packed per row (None: symmetric)."""
    k, n = blocks.shape
    nb, bs = blocks.n_blocks, blocks.block_size
    z = blocks.zero_points()
    padded = np.repeat(z, bs, axis=1)  # every code its block's zero point, then the real codes over it
    padded[:, :k] = blocks.codes
    b = pack(padded, blocks.bits).reshape(n, nb, bs * blocks.bits // 8)
    zero_points = None if blocks.zero_point is None else pack(z, blocks.bits).reshape(-1)
    return b, blocks.scale.reshape(-1), zero_points


def matmulnbits_node(
    name: str, a: str, out: str, inputs: dict[str, str], blocks: Blocks, accuracy_level: int
) -> onnx.NodeProto:
    """The MatMulNBits node ``out = a @ W (+ bias)`` reading the initializers named in ``inputs`` (``"B"``,
    ``"scales"``, and optionally ``"zero_points"`` and ``"bias"``)."""
    k, n = blocks.shape
    names = [a, inputs["B"], inputs["scales"], inputs.get("zero_points", "")]
    if "bias" in inputs:
        names += ["", inputs["bias"]]  # g_idx left out
    while names[-1] == "":
        names.pop()
    return helper.make_node(
        "MatMulNBits",
        names,
        [out],
        name=name,
        domain=DOMAIN,
        K=k,
        N=n,
        bits=blocks.bits,
        block_size=blocks.block_size,
        accuracy_level=accuracy_level,
    )


def dequantize_initializers(blocks: Blocks, per_channel: bool) -> dict[str, onnx.TensorProto]:
    """The initializers of a DequantizeLinear that gives ``W`` (K, N): ``"x"``, ``"scale"`` and, with zero
    points, ``"zero_point"``; blocked along K (axis 0) or, with ``per_channel``, one scale per output (axis 1).
    Symmetric codes are stored signed (int4/int8, zero point 0), asymmetric ones unsigned with their zero points."""
    signed = blocks.zero_point is None
    half = 1 << (blocks.bits - 1)
    codes = blocks.codes.T.astype(np.int16)
    elem = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
            (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}[(blocks.bits, signed)]  # fmt: skip
    scale = blocks.scale.T.copy()  # (n_blocks, N)
    zero = None if signed else blocks.zero_point.T.astype(np.uint8)
    if per_channel:
        scale = scale.reshape(-1)
        zero = None if zero is None else zero.reshape(-1)
    out = {"x": _int_tensor(codes - half if signed else codes, elem), "scale": numpy_helper.from_array(scale)}
    if zero is not None:
        out["zero_point"] = _int_tensor(zero, TensorProto.UINT4 if blocks.bits == 4 else TensorProto.UINT8)
    return out


def _int_tensor(values: np.ndarray, elem: int) -> onnx.TensorProto:
    """A TensorProto of an integer type; 4-bit codes as raw bytes, two a byte in flat order, the first in the
    low nibble (ONNX's packing)."""
    values = np.asarray(values)
    if elem in (TensorProto.INT8, TensorProto.UINT8):
        return numpy_helper.from_array(values.astype(np.int8 if elem == TensorProto.INT8 else np.uint8))
    flat = (values.reshape(1, -1).astype(np.int16) & 0xF).astype(np.uint8)
    t = TensorProto(data_type=elem, dims=list(values.shape))
    t.raw_data = pack(flat, 4).tobytes()
    return t
