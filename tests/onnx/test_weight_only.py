"""Weight-only quantization end to end: lowbit.onnx.quantize and ``lowbit quantize --weight-only``."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.cli import main
from lowbit.onnx import Options, quantize
from lowbit.onnx.gptq import passes
from lowbit.onnx.graph import Graph
from lowbit.onnx.model import session
from lowbit.onnx.settings import QuantizeError, Settings, WeightOnly, edit
from lowbit.onnx.weight_only import fit, fit_gptq, linears, round_weights
from lowbit.recipe import Config, LayerConfig, QuantizerConfig, preset
from tests.onnx import models

QUIET = Options(progress=False, compare=False)


def _config(bits=4, group=16, symmetric=True, target=None, rounding=None, act_order=False) -> Config:
    weight = QuantizerConfig(bits=bits, symmetric=symmetric, signed=symmetric, granularity="group",
                             group_size=group)  # fmt: skip
    return Config(LayerConfig(None, weight), target=target, rounding=rounding, act_order=act_order)


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    d = tmp_path_factory.mktemp("attention")
    model = models.attention_block(hidden=32)
    feeds = models.attention_feeds(n=64, tokens=12, hidden=32)
    np.savez(d / "calib.npz", **feeds)
    return models.save(model, d / "att.onnx"), str(d / "calib.npz"), model, feeds


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _cosine(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_ort_writes_matmulnbits_and_leaves_every_other_op(attention, tmp_path, rounding):
    path, calib, model, feeds = attention
    out = tmp_path / "wo.onnx"
    result = quantize(path, out, calib, _config(rounding=rounding), options=QUIET)
    q = onnx.load(str(out))
    before, after = _ops(model), _ops(q)
    assert after["MatMulNBits"] == 6 == result.layers  # q, k, v, o, up, down; not the two activation MatMuls
    assert after["MatMul"] == 2 and "QuantizeLinear" not in after and "DequantizeLinear" not in after
    assert {op: n for op, n in after.items() if op not in ("MatMul", "MatMulNBits")} == {
        op: n for op, n in before.items() if op != "MatMul"
    }
    assert any(o.domain == "com.microsoft" for o in q.opset_import)
    x = {k: v[:16] for k, v in feeds.items()}
    (ref,) = session(model).run(None, x)
    (y,) = session(q).run(None, x)
    assert _cosine(y, ref) > 0.95
    assert result.rounding == rounding and (result.rounded_layers > 0) == (rounding == "gptq")


def test_trt_writes_blocked_int4_dequantize_at_opset_21(attention, tmp_path):
    path, _, model, feeds = attention
    out = tmp_path / "trt.onnx"
    quantize(path, out, None, _config(target="trt"), options=QUIET)
    q = onnx.load(str(out))
    after = _ops(q)
    assert after["DequantizeLinear"] == 6 and after["MatMul"] == 8 and "QuantizeLinear" not in after
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 21
    weights = {t.name: t for t in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type == "DequantizeLinear":
            assert weights[node.input[0]].data_type == TensorProto.INT4 and len(node.input) == 2
    x = {k: v[:8] for k, v in feeds.items()}
    (ref,) = session(model).run(None, x)
    (y,) = session(q, optimize=False).run(None, x)
    assert _cosine(y, ref) > 0.95


def _gemm(alpha=1.0, beta=1.0, trans_b=1, k=40, n=6, seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "c")]
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], "fc", alpha=alpha, beta=beta, transB=trans_b)
    relu = helper.make_node("Relu", ["y"], ["z"], "relu")
    graph = helper.make_graph([node, relu], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", n])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("target", ["ort", "qdq"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_beta_transb_and_its_bias(tmp_path, target, trans_b):
    model = _gemm(alpha=0.5, beta=2.0, trans_b=trans_b)
    path = models.save(model, tmp_path / "gemm.onnx")
    out = tmp_path / "q.onnx"
    quantize(path, out, None, _config(bits=8, group=16, target=target, symmetric=False), options=QUIET)
    q = onnx.load(str(out))
    ops = [n.op_type for n in q.graph.node]
    assert ops == (["MatMulNBits", "Relu"] if target == "ort" else ["DequantizeLinear", "MatMul", "Add", "Relu"])
    if target == "ort":
        assert len(q.graph.node[0].input) == 6  # A, B, scales, zero_points, g_idx (empty), bias
    x = np.random.default_rng(1).standard_normal((4, 40)).astype(np.float32)
    (ref,) = session(model).run(None, {"x": x})
    (y,) = session(q, optimize=False).run(None, {"x": x})
    np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())


def _correlated(n: int, k: int, seed: int) -> np.ndarray:
    """Inputs whose features are strongly correlated (a few shared factors plus a little noise)."""
    mix = np.random.default_rng(0).standard_normal((4, k))  # the same factors for calibration and test
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 4)) @ mix + 0.05 * rng.standard_normal((n, k))).astype(np.float32)


@pytest.mark.parametrize(("group", "act_order"), [(32, False), (32, True), (None, False)])
def test_gptq_lowers_the_output_error_on_correlated_inputs(group, act_order):
    rng = np.random.default_rng(0)
    k, n = 64, 16
    model, _ = models.single_layer("MatMul", rng.standard_normal((k, n)), ["N", k])
    graph = Graph(model)
    layers, _ = linears(graph, Settings.of(_config()))
    calib = _correlated(1024, k, 1)
    feeds = lambda: ({"x": calib[i : i + 64]} for i in range(0, len(calib), 64))  # noqa: E731
    wo = WeightOnly(4, group, True, "matmulnbits" if group else "dequantize", None, act_order)
    w = layers[0].matrix(graph)
    test = _correlated(512, k, 2).astype(np.float64)
    errors = {}
    for rounding in ("nearest", "gptq"):
        rounded = round_weights(model, layers, wo, rounding, feeds, progress=False)
        wq = rounded.blocks[layers[0].weight].dequantize()
        errors[rounding] = float(np.mean((test @ wq - test @ w.T) ** 2))
    assert rounded.gptq_layers == 1
    assert errors["gptq"] < 0.5 * errors["nearest"]


def test_a_small_memory_budget_splits_the_passes_and_gives_the_same_codes(attention):
    _, _, model, feeds = attention
    graph = Graph(model)
    layers, _ = linears(graph, Settings.of(_config()))
    g_layers = [layer.layer(graph) for layer in layers]
    one = passes(g_layers)
    assert len(one) == 1
    per_h = 8 * 32 * 32  # one 32-input H; q/k/v share theirs (one input), o and up another each, down 128 inputs
    split = passes(g_layers, budget=per_h)
    assert [len(p) for p in split] == [3, 1, 1, 1]  # q, k, v together: they read the same rows
    data = lambda: iter([{k: v[i : i + 8] for k, v in feeds.items()} for i in range(0, 64, 8)])  # noqa: E731
    wo = WeightOnly(4, 16, True, "matmulnbits", "gptq", False)
    big = round_weights(model, layers, wo, "gptq", data, progress=False)
    small = round_weights(model, layers, wo, "gptq", data, budget=per_h, progress=False)
    assert (big.passes, small.passes) == (1, 4)
    assert small.peak_hessian_bytes == 8 * 128 * 128 < big.peak_hessian_bytes
    assert big.gptq_layers == small.gptq_layers == 5  # down (128 inputs) sees too few rows: nearest
    for name, blocks in big.blocks.items():
        np.testing.assert_array_equal(blocks.codes, small.blocks[name].codes)
        np.testing.assert_array_equal(blocks.scale, small.blocks[name].scale)


def test_the_preset_and_the_flags_build_the_same_recipe():
    by_flags = edit(preset("int8"), weight_only="int4")
    assert by_flags.default == preset("w4a16_group128").default
    assert Settings.of(by_flags).weight_only == WeightOnly(4, 128, True, "matmulnbits", None, False)
    asym = Settings.of(edit(preset("w4a16_group128"), group_size=32, asymmetric=True, act_order=True, rounding="gptq"))
    assert asym.weight_only == WeightOnly(4, 32, False, "matmulnbits", "gptq", True)
    assert Settings.of(edit(preset("int8"), weight_only="int8", target="trt")).weight_only.group_size is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_config(group=48), "--group-size 48: a block size is a power of two"),
        (_config(symmetric=False, target="trt"), "--asymmetric: TensorRT takes symmetric weights only"),
        (
            replace(_config(), rounding="stochastic"),
            "rounds by nearest or gptq or awq or awq\\+gptq",
        ),
        (replace(_config(), rounding="nearest", act_order=True), "--act-order orders GPTQ's columns"),
        (replace(_config(), smoothquant=0.5), "--smoothquant does not apply to weight-only"),
        (replace(_config(), keep_ends_8bit=True), "keep_ends_8bit does not apply to weight-only"),
        (replace(_config(), attention_matmuls=True), "attention_matmuls does not apply to weight-only"),
        (replace(_config(), bias_correction=True), "bias_correction does not apply to weight-only"),
        (replace(preset("int8"), act_order=True), "the int8 path rounds in natural order"),
        (replace(preset("int8"), attention_matmuls=True), "attention_matmuls is for Hugging Face models"),
    ],
)
def test_recipes_that_do_not_fit_are_one_line_errors(config, message):
    with pytest.raises(QuantizeError, match=message):
        Settings.of(config)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--weight-only", "int4", "--group-size", "48"], "--group-size 48: a block size is a power of two"),
        (["--weight-only", "int4", "--asymmetric", "--target", "trt"], "takes symmetric weights only"),
        (["--weight-only", "int4", "--rounding", "gptq"], "GPTQ rounding fits the weights to calibration data"),
        (["--weight-only", "int4", "--rounding", "awq"], "AWQ rounding fits the weights to calibration data"),
        (["--weight-only", "int4", "--rounding", "awq", "--act-order"], "--act-order orders GPTQ's columns"),
        (["--weight-only", "int4", "--act-order"], "GPTQ needs calibration data: give --calib"),
        (["--group-size", "32"], "add --weight-only int4|int8"),
    ],
)
def test_cli_errors_are_one_line(attention, tmp_path, capsys, flags, message):
    path = attention[0]
    assert main(["quantize", path, "-o", str(tmp_path / "o.onnx"), "-q", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_cli_weight_only_with_calibration_prints_the_comparison(attention, tmp_path, capsys):
    path, calib, _, _ = attention
    out = tmp_path / "o.onnx"
    args = ["quantize", path, "-o", str(out), "--calib", calib, "--weight-only", "int4", "--group-size", "16", "-q"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "int4 symmetric, blocks of 16, MatMulNBits" in text and "GPTQ rounding on 5 layers" in text
    assert "INT4 weight-only / FP32" in text and "cosine" in text
    assert "GPTQ second moments: 1 pass over the data" in text
    assert out.exists() and (tmp_path / "o.ranges.json").exists()


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_pads_a_last_short_group_with_dead_columns(symmetric):
    """K = 40 in groups of 16: GPTQ rounds 48 columns, the 8 padded ones dead (no input), and keeps 40 codes whose
    output error is below nearest rounding's; the asymmetric grid keeps its zero points in range."""
    rng = np.random.default_rng(5)
    k, n = 40, 8
    w = rng.standard_normal((n, k))
    x = _correlated(2048, k, 3).astype(np.float64)
    h = x.T @ x / len(x)
    wo = WeightOnly(4, 16, symmetric, "matmulnbits", "gptq", False)
    blocks = fit_gptq(w, h, wo)
    assert blocks.codes.shape == (n, k) and blocks.scale.shape == (n, 3)
    assert blocks.codes.max() <= 15 and (symmetric or blocks.zero_point.max() <= 15)
    errors = [np.mean((x @ (b.dequantize() - w.T)) ** 2) for b in (fit(w, wo), blocks)]
    assert errors[1] < 0.5 * errors[0]


def test_mse_ranges_lower_the_weight_error_of_nearest_rounding():
    w = np.random.default_rng(6).standard_normal((16, 256))  # Gaussian: clipping the tails pays at 4 bits
    errors = {}
    for layout in ("dequantize", "matmulnbits"):
        for method in ("minmax", "mse"):
            blocks = fit(w, WeightOnly(4, 64, True, layout, "nearest", False, method))
            errors[layout, method] = np.mean((blocks.dequantize().T - w) ** 2)
    assert errors["dequantize", "mse"] < 0.9 * errors["dequantize", "minmax"]  # on the grid [-7, 7]
    # MatMulNBits' whole signed grid [-8, 7] (block_qparams) beats [-7, 7] at min/max (about as well as mse does)
    assert errors["matmulnbits", "minmax"] < 0.9 * errors["dequantize", "minmax"]
    config = edit(preset("int8"), weight_only="int4", weight_method="mse")
    assert Settings.of(config).weight_only.method == "mse"
    with pytest.raises(QuantizeError, match="fits each block's range by minmax or mse"):
        Settings.of(edit(preset("int8"), weight_only="int4", weight_method="admm"))


@pytest.mark.parametrize(("extra", "flag"), [({"dynamic": True}, "--dynamic"), ({"format": "fp8"}, "--format fp8")])
def test_weight_only_with_activation_quantization_flags_is_an_error(extra, flag):
    with pytest.raises(QuantizeError, match=f"--weight-only keeps activations float; {flag} quantizes them"):
        edit(preset("int8"), weight_only="int4", **extra)


def test_only_constant_weights_are_reported_as_kept_in_float(attention):
    model = attention[2]
    graph = Graph(model)
    layers, skipped = linears(graph, Settings.of(edit(preset("int8"), weight_only="int4", exclude=["^up_matmul$"])))
    assert len(layers) == 5 and skipped == ["up_matmul"]  # not the scores/context MatMuls of two activations


def test_awq_scales_the_salient_inputs_and_lowers_the_output_error_of_nearest_rounding(tmp_path):
    model = models.attention_block(hidden=32)
    feeds = models.attention_feeds(n=64, tokens=12, hidden=32)
    feeds["x"][..., [3, 17]] *= 30.0  # outlier channels entering q, k, v (after the LayerNorm-free block input)
    np.savez(tmp_path / "calib.npz", **feeds)
    path = models.save(model, tmp_path / "att.onnx")
    x = {k: v[:32] for k, v in feeds.items()}
    (ref,) = session(model).run(None, x)
    errors = {}
    for rounding in ("nearest", "awq", "awq+gptq"):
        out = tmp_path / f"{rounding}.onnx"
        result = quantize(path, out, str(tmp_path / "calib.npz"), _config(rounding=rounding), options=QUIET)
        q = onnx.load(str(out))
        assert _ops(q)["MatMulNBits"] == 6 and result.rounding == rounding
        assert (result.smoothing is not None) == rounding.startswith("awq")
        (y,) = session(q).run(None, x)
        errors[rounding] = float(np.mean((y - ref) ** 2))
    assert errors["awq"] < 0.8 * errors["nearest"]
    assert errors["awq+gptq"] < errors["nearest"]


def test_weight_only_flags_keep_the_recipes_float_overrides():
    config = edit(preset("w4a16_group128").override("*lm_head*", None), group_size=64)
    assert config.overrides == (("*lm_head*", None),) and config.default.weight.group_size == 64
    assert Settings.of(config).float_globs == ("*lm_head*",)


def test_awq_leaves_the_inputs_of_layers_kept_in_float_alone(tmp_path):
    model = models.attention_block(hidden=32)
    feeds = models.attention_feeds(n=32, tokens=12, hidden=32)
    np.savez(tmp_path / "calib.npz", **feeds)
    path = models.save(model, tmp_path / "att.onnx")
    config = replace(_config(rounding="awq"), exclude=("q_matmul|k_matmul|v_matmul",))
    result = quantize(path, tmp_path / "o.onnx", str(tmp_path / "calib.npz"), config, options=QUIET)
    q = onnx.load(str(tmp_path / "o.onnx"))
    assert _ops(q)["MatMulNBits"] == 3 and result.smoothing is not None
    smoothed = {e.tensor for e in result.smoothing.entries}
    assert "x" not in smoothed and smoothed  # q, k, v read x: excluded, so x is not scaled
    np.testing.assert_array_equal(
        numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == "q_w")),
        numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "q_w")),
    )
