"""The weight-only layouts against ONNX Runtime's kernels, onnx.reference and a plain-loop decoder kept here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from lowbit.onnx.graph import Graph
from lowbit.onnx.matmulnbits import check_block_size, pack
from lowbit.onnx.model import session
from lowbit.onnx.settings import Settings, WeightOnly
from lowbit.onnx.weight_only import fit, linears, write
from lowbit.recipe import Config, LayerConfig, QuantizerConfig


def _matmul(w: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _wo(bits, group, symmetric, layout) -> WeightOnly:
    return WeightOnly(bits, group, symmetric, layout, "nearest", False)


def _plain_codes(w: np.ndarray, bits: int, group: int, symmetric: bool, whole_grid: bool = False):
    """Per output channel n and block b, loop by loop: the scale, zero point and codes of the module doc
    (``whole_grid``: symmetric MatMulNBits' grid, block_qparams' doc)."""
    k, n = w.shape
    blocks = -(-k // group)
    scale = np.zeros((n, blocks))
    zero = np.zeros((n, blocks), int)
    codes = np.zeros((n, k), int)
    for j in range(n):
        for b in range(blocks):
            v = w[b * group : (b + 1) * group, j].astype(np.float64)
            if symmetric and whole_grid:  # the extreme value, its sign kept, on the lowest code -2^(b-1)
                m = v.max() if abs(v.max()) >= abs(v.min()) else v.min()
                s = np.float32(m / -(2 ** (bits - 1)))
                z, lo, hi = 2 ** (bits - 1), 0, 2**bits - 1
            elif symmetric:
                s = np.float32(max(abs(v.min()), abs(v.max())) / (2 ** (bits - 1) - 1))
                z, lo, hi = 2 ** (bits - 1), 0, 2**bits - 1
            else:
                lo_v, hi_v = min(v.min(), 0.0), max(v.max(), 0.0)
                s = np.float32((hi_v - lo_v) / (2**bits - 1))
                z, lo, hi = int(np.clip(np.rint(-lo_v / np.float64(s)), 0, 2**bits - 1)), 0, 2**bits - 1
            scale[j, b], zero[j, b] = s, z
            for i, x in enumerate(v):
                codes[j, b * group + i] = int(np.clip(np.rint(np.float32(x) / s) + z, lo, hi))
    return scale, zero, codes


def _decode_matmulnbits(model: onnx.ModelProto):
    """W (K, N) from a MatMulNBits node's initializers, byte by byte, as ONNX Runtime's schema describes them."""
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, bs = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    b, scales = inits[node.input[1]], inits[node.input[2]]
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    blocks = -(-k // bs)
    assert b.shape == (n, blocks, bs * bits // 8) and b.dtype == np.uint8 and scales.shape == (n * blocks,)
    per_byte = 8 // bits
    zp_row = -(-blocks // per_byte)
    w = np.zeros((k, n))
    for j in range(n):
        for blk in range(blocks):
            if zp is None:
                z = 2 ** (bits - 1)
            else:
                byte = zp[j * zp_row + blk // per_byte]
                z = (byte >> (bits * (blk % per_byte))) & (2**bits - 1)
            for i in range(bs):
                kk = blk * bs + i
                if kk >= k:
                    break
                byte = b[j, blk, i // per_byte]
                q = (byte >> (bits * (i % per_byte))) & (2**bits - 1)
                w[kk, j] = (int(q) - int(z)) * scales[j * blocks + blk]
    return w, attrs


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 80, 12])  # whole blocks, a padded last block, fewer inputs than one block
def test_matmulnbits_matches_onnxruntime_and_a_plain_decoder(bits, symmetric, k):
    rng = np.random.default_rng(bits * 100 + k)
    n, group = 6, 32
    w = (rng.standard_normal((k, n)) + (0.0 if symmetric else 0.4)).astype(np.float32)
    model = _matmul(w)
    graph = Graph(model)
    layers, _ = linears(graph, Settings.of(Config(LayerConfig(None, QuantizerConfig(bits=bits, granularity="group",
                                                                                     group_size=group)))))  # fmt: skip
    wo = _wo(bits, group, symmetric, "matmulnbits")
    blocks = {"w": fit(layers[0].matrix(graph), wo)}
    out = write(model, layers, blocks, wo)
    assert [n.op_type for n in out.graph.node] == ["MatMulNBits"]
    assert {t.name for t in out.graph.initializer}.isdisjoint({"w"})  # the float weight is gone
    decoded, attrs = _decode_matmulnbits(out)
    assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == (k, n, bits, group)
    scale, zero, codes = _plain_codes(w, bits, group, symmetric, whole_grid=True)
    np.testing.assert_array_equal(blocks["w"].codes, codes)  # integer codes compare exactly
    np.testing.assert_array_equal(blocks["w"].zero_points(), zero)
    np.testing.assert_allclose(blocks["w"].scale, scale, rtol=1e-6)
    expected = np.zeros((k, n))
    for j in range(n):
        for kk in range(k):
            expected[kk, j] = (codes[j, kk] - zero[j, kk // group]) * np.float32(scale[j, kk // group])
    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-7)
    x = rng.standard_normal((5, k)).astype(np.float32)
    (y,) = session(out).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ expected, rtol=1e-4, atol=1e-4 * np.abs(x @ expected).max())
    # Nearest rounding; symmetric, a value opposite the extreme may clip one step short of it.
    assert np.abs(decoded - w).max() <= np.abs(blocks["w"].scale).max() * (1.0 if symmetric else 0.5) + 1e-6


def test_symmetric_int4_has_no_zero_point_input_and_uses_code_8():
    w = np.linspace(-1, 1, 32 * 4, dtype=np.float32).reshape(32, 4)
    model = _matmul(w)
    graph = Graph(model)
    wo = _wo(4, 16, True, "matmulnbits")
    layers, _ = linears(graph, Settings.of("w4a16_group128"))
    out = write(model, layers, {"w": fit(layers[0].matrix(graph), wo)}, wo)
    node = out.graph.node[0]
    assert len(node.input) == 3  # A, B, scales: ORT's default zero point 2^(bits-1) = 8
    zero_w = np.zeros((16, 2), np.float32)
    zero_w[:, 1] = 1.0
    blocks = fit(zero_w.T.astype(np.float64), wo)
    assert (blocks.codes[0] == 8).all()  # 0.0 is code 8


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 40])
def test_blocked_dequantize_matches_onnx_reference_and_onnxruntime(symmetric, k):
    rng = np.random.default_rng(k)
    n, group = 5, 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    model = _matmul(w)
    graph = Graph(model)
    wo = _wo(4, group, symmetric, "dequantize")
    layers, _ = linears(graph, Settings.of("w4a16_group128"))
    out = write(model, layers, {"w": fit(layers[0].matrix(graph), wo)}, wo)
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "MatMul"]
    assert out.opset_import[0].version >= 21
    dq = out.graph.node[0]
    q = next(t for t in out.graph.initializer if t.name == dq.input[0])
    assert q.data_type == (onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4)
    assert tuple(q.dims) == (k, n)
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": group}
    scale, zero, codes = _plain_codes(w, 4, group, symmetric)
    expected = np.array([[(codes[j, i] - zero[j, i // group]) * np.float32(scale[j, i // group]) for j in range(n)]
                         for i in range(k)])  # fmt: skip
    x = rng.standard_normal((3, k)).astype(np.float32)
    (ref,) = ReferenceEvaluator(out).run(None, {"x": x})
    (y,) = session(out, optimize=False).run(None, {"x": x})
    np.testing.assert_allclose(ref, x @ expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, x @ expected, rtol=1e-4, atol=1e-4)
    # ONNX Runtime's optimizer fuses the blocked DequantizeLinear + MatMul into its MatMulNBits with
    # accuracy_level 4 (session.qdq_matmulnbits_accuracy_level): activations to int8 per block, so ~1% off
    (fused,) = session(out).run(None, {"x": x})
    assert 0 < np.abs(fused - ref).max() < 0.02 * np.abs(ref).max()


def test_int8_per_channel_dequantize():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 4)).astype(np.float32)
    model = _matmul(w)
    graph = Graph(model)
    wo = _wo(8, None, True, "dequantize")
    layers, _ = linears(graph, Settings.of("w4a16_group128"))
    out = write(model, layers, {"w": fit(layers[0].matrix(graph), wo)}, wo)
    dq = out.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 1}
    q = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == dq.input[0]))
    assert q.dtype == np.int8 and q.shape == (24, 4)
    s = np.abs(w).max(axis=0) / 127
    np.testing.assert_array_equal(q, np.clip(np.rint(w / s.astype(np.float32)), -128, 127))
    x = rng.standard_normal((2, 24)).astype(np.float32)
    (ref,) = ReferenceEvaluator(out).run(None, {"x": x})
    np.testing.assert_allclose(session(out, optimize=False).run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-5)


def test_pack_puts_the_even_code_in_the_low_nibble():
    assert pack(np.array([[1, 2, 3]]), 4).tolist() == [[0x21, 0x03]]
    assert pack(np.array([[200, 7]]), 8).tolist() == [[200, 7]]


@pytest.mark.parametrize("size", [8, 48, 100, True, 16.0])
def test_block_size_must_be_a_power_of_two_of_16_or_more(size):
    with pytest.raises(ValueError, match="power of two"):
        check_block_size(size)
