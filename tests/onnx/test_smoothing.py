"""SmoothQuant and AWQ on ONNX models: every fold keeps the float outputs (checked against ONNX's reference
evaluator on the original model), the scales are core.smooth_scales', smoothing lowers W8A8 error on outlier
channels, and the pipeline's --smoothquant writes a model ONNX Runtime loads."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from lowbit.cli import main
from lowbit.core import QuantSpec, fake_quant, qparams_from_tensor
from lowbit.core.smoothing import columns_amax, smooth_scales
from lowbit.onnx import Options, quantize, smoothing
from lowbit.onnx.model import session
from lowbit.onnx.settings import QuantizeError, Settings, edit
from lowbit.recipe import preset
from tests.onnx import models

K = 8


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _model(nodes, inits, outputs=("y",), x_shape=("N", 4, K)):
    graph = helper.make_graph(
        nodes,
        "smooth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None]) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _weights(rng, *names, k=K, n=K):
    return [_const(name, rng.standard_normal((k, n)) * 0.5) for name in names]


def _layernorm_qkv():
    """LayerNorm -> q, k, v MatMuls (a pre-LN block): one tensor, three readers, folded into the LayerNorm."""
    rng = np.random.default_rng(0)
    inits = _weights(rng, "wq", "wk", "wv")
    inits += [_const("gamma", rng.uniform(0.5, 2, K)), _const("beta", rng.standard_normal(K))]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], "ln", axis=-1)]
    nodes += [helper.make_node("MatMul", ["ln", f"w{n}"], [n], f"{n}_matmul") for n in "qkv"]
    return _model(nodes, inits, ("q", "k", "v"))


def _decomposed_layernorm():
    """LayerNorm written as ReduceMean/Sub/Pow/.../Div, then ``* gamma + beta``, read by a Gemm (transB)."""
    rng = np.random.default_rng(1)
    inits = [_const("gamma", rng.uniform(0.5, 2, K)), _const("beta", rng.standard_normal(K)),
             _const("two", 2.0), _const("eps", 1e-5), _const("w", rng.standard_normal((6, K))),
             _const("b", rng.standard_normal(6))]  # fmt: skip
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]),
        helper.make_node("Sub", ["x", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["g"], "ln_gamma"),
        helper.make_node("Add", ["g", "beta"], ["ln"], "ln_beta"),
        helper.make_node("Gemm", ["ln", "w", "b"], ["y"], "fc", transB=1),
    ]
    return _model(nodes, inits, x_shape=("N", K))


def _matmul_chain():
    """MatMul + bias Add -> MatMul: folded into the first MatMul's columns and its bias."""
    rng = np.random.default_rng(2)
    inits = [*_weights(rng, "w1", "w2"), _const("b1", rng.standard_normal(K))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], "fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], "fc1_bias"),
        helper.make_node("MatMul", ["hb", "w2"], ["y"], "fc2"),
    ]
    return _model(nodes, inits)


def _residual():
    """x -> MatMul and a residual Add of x: the input has another reader, so a Div goes before the MatMul."""
    rng = np.random.default_rng(3)
    inits = _weights(rng, "w")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["h"], "fc"),
        helper.make_node("Add", ["h", "r"], ["y"], "residual"),
    ]
    return _model(nodes, inits)


def _heads():
    """Two-head attention as BERT exporters write it: v = x Wv + bv split into heads (Reshape, Transpose),
    probs @ v, heads merged back (Transpose, Reshape), then the output projection. Its input folds all the way
    back into Wv and bv."""
    rng = np.random.default_rng(6)
    inits = [*_weights(rng, "wq", "wk", "wv", "wo"), _const("bv", rng.standard_normal(K))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("split", [0, 0, 2, 4]),
                                                                            ("merge", [0, 0, K]))]  # fmt: skip
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}_mm"], f"{n}_matmul")]
    nodes += [
        helper.make_node("Add", ["v_mm", "bv"], ["v"], "v_bias"),
        helper.make_node("Reshape", ["q_mm", "split"], ["q_h"]),
        helper.make_node("Reshape", ["k_mm", "split"], ["k_h"]),
        helper.make_node("Reshape", ["v", "split"], ["v_h"], "v_heads"),
        helper.make_node("Transpose", ["q_h"], ["q_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_h"], ["k_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_h"], ["v_t"], "v_t", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores"], "scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_t"], ["context"], "context"),
        helper.make_node("Transpose", ["context"], ["c_t"], "c_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["c_t", "merge"], ["merged"], "c_merge"),
        helper.make_node("MatMul", ["merged", "wo"], ["y"], "o_matmul"),
    ]
    return _model(nodes, inits)


def _outlier_feeds(n=4, seed=7):
    """Batches of x (2, 4, K) with two outlier channels 30x the others."""
    rng = np.random.default_rng(seed)
    gain = np.ones(K, np.float32)
    gain[[1, 5]] = 30.0
    return [{"x": (rng.standard_normal((2, 4, K)) * gain).astype(np.float32)} for _ in range(n)]


def _same_outputs(model, smoothed, feeds):
    """The smoothed model (in ONNX Runtime) gives the original's outputs (ONNX's reference evaluator)."""
    reference, sess = ReferenceEvaluator(model), session(smoothed)
    for feed in feeds:
        for want, got in zip(reference.run(None, feed), sess.run(None, feed), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize(
    ("build", "folded", "x_shape"),
    [
        (_layernorm_qkv, "LayerNormalization ln", (2, 4, K)),
        (_decomposed_layernorm, "Mul ln_gamma + Add ln_beta", (8, K)),
        (_matmul_chain, "MatMul fc1 + Add fc1_bias", (2, 4, K)),
        (_residual, "inserted Div", (2, 4, K)),
        (_heads, "MatMul v_matmul + Add v_bias + Reshape v_heads + Transpose v_t + MatMul context", (2, 4, K)),
    ],
)
@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_each_fold_keeps_the_float_outputs(build, folded, x_shape, method):
    model = build()
    rng = np.random.default_rng(4)
    feeds = [{"x": (rng.standard_normal(x_shape) * [1, 20, 1, 1, 1, 8, 1, 1]).astype(np.float32)} for _ in range(3)]
    before = model.SerializeToString()
    if method == "smoothquant":
        smoothed, report = smoothing.smoothquant(model, feeds, 0.5, progress=False)
    else:
        smoothed, report = smoothing.awq(model, feeds, lambda w: np.round(w * 2) / 2, progress=False)
    assert model.SerializeToString() == before  # the input model is not changed
    entry = report.entries[-1]
    assert entry.folded.endswith(folded) or entry.folded.startswith(folded), entry.folded
    assert entry.method == method
    if entry.exponent > 0:  # AWQ may find a = 0 (no scaling) best
        moved = numpy_helper.to_array(_init(smoothed, entry)), numpy_helper.to_array(_init(model, entry))
        assert not np.allclose(*moved)
    _same_outputs(model, smoothed, feeds)


def _init(model, entry):
    """The weight of the entry's first reader in ``model``."""
    node = next(n for n in model.graph.node if n.name == entry.readers[0])
    return next(t for t in model.graph.initializer if t.name == node.input[1])


def test_q_k_v_share_one_scale_from_a_known_outlier_channel():
    model = _layernorm_qkv()
    feeds = _outlier_feeds()
    smoothed, report = smoothing.smoothquant(model, feeds, 0.5, progress=False)
    (entry,) = report.entries
    assert entry.readers == ["q_matmul", "k_matmul", "v_matmul"] and entry.folded == "LayerNormalization ln"
    # what core.smooth_scales gives from max|LayerNorm output| and the three weights' column maxima
    ln = ReferenceEvaluator(_model(model.graph.node[:1], list(model.graph.initializer), ("ln",)))
    amax = np.max([np.abs(ln.run(None, f)[0]).reshape(-1, K).max(0) for f in feeds], axis=0)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    want = smooth_scales(amax, columns_amax([weights[f"w{n}"].T for n in "qkv"]), 0.5)
    got = {t.name: numpy_helper.to_array(t) for t in smoothed.graph.initializer}
    for n in "qkv":
        np.testing.assert_allclose(got[f"w{n}"], weights[f"w{n}"] * want[:, None], rtol=1e-5)
    np.testing.assert_allclose(got["gamma"], weights["gamma"] / want, rtol=1e-5)
    _same_outputs(model, smoothed, feeds)


def test_the_attention_block_keeps_its_outputs():
    model = models.attention_block()
    f = models.attention_feeds(16)
    feeds = [{k: v[i : i + 8] for k, v in f.items()} for i in (0, 8)]
    smoothed, report = smoothing.smoothquant(model, feeds, "search", progress=False)
    assert {e.tensor for e in report.entries} == {"x", "context", "ln1", "gelu"}
    folded = {e.tensor: e.folded for e in report.entries}
    assert folded["gelu"] == "Mul gelu"  # GELU's * 0.5
    assert folded["context"] == "MatMul v_matmul + Add v_add + MatMul context"  # into v, which reads x (smoothed)
    assert folded["x"] == folded["ln1"] == "inserted Div"  # both feed a residual Add too
    _same_outputs(model, smoothed, feeds)


def test_smoothquant_lowers_the_w8a8_error_of_outlier_channels():
    rng = np.random.default_rng(5)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], "fc")], _weights(rng, "w"))
    feeds = _outlier_feeds(8)
    for alpha in (0.5, "search"):
        smoothed, report = smoothing.smoothquant(model, feeds, alpha, progress=False)
        (entry,) = report.entries
        assert entry.error < 0.5 * entry.plain_error, (alpha, entry)
        # the same on the models themselves: x and W fake-quantized in W8A8 (per tensor, per output channel)
        errors = []
        for m in (model, smoothed):
            reference = ReferenceEvaluator(m)
            errors.append(np.mean([(reference.run(None, f)[0] - _w8a8(m, f["x"])) ** 2 for f in feeds]))
        assert errors[1] < 0.5 * errors[0], (alpha, errors)


def _w8a8(model, x):
    """The single MatMul (after an inserted Div, if any) with its input and weight fake-quantized to int8."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Div":
            x = x / values[node.input[1]]
    w = values[model.graph.node[-1].input[1]]
    quantize_input, quantize_weight = smoothing.int8_quantizers()
    return quantize_input(x.astype(np.float32)) @ quantize_weight(w.T).T


def test_the_row_sample_is_bounded_and_uniform():
    sample = smoothing.RowSample(rows=50, seed=0)
    for i in range(40):
        sample.update(np.full((5, 2), i, np.float32))  # rows of batch i hold i
    assert sample.rows.shape == (50, 2) and sample.seen == 200
    assert sample.stats.count == 200 and sample.stats.amax.tolist() == [39, 39]
    assert 10 < sample.rows[:, 0].mean() < 30  # drawn over the whole stream, not its first or last batches


@pytest.mark.parametrize("bad", [1.5, -0.1, "half", True, None])
def test_bad_alpha_is_a_one_line_error(bad):
    with pytest.raises(smoothing.SmoothingError, match=r"--smoothquant\) must be alpha in \[0, 1\]") as info:
        smoothing.smoothquant(_residual(), _outlier_feeds(1), bad, progress=False)
    assert "\n" not in str(info.value)


def test_the_pipeline_smooths_before_calibration(tmp_path):
    path = models.save(models.attention_block(), tmp_path / "block.onnx")
    np.savez(tmp_path / "calib.npz", **models.attention_feeds(48))
    for target in ("ort", "trt"):
        config = edit(preset("int8"), smoothquant=0.5, target=target)
        out = tmp_path / f"block_{target}.onnx"
        result = quantize(path, out, tmp_path / "calib.npz", config, options=Options(progress=False))
        assert result.smoothing is not None and len(result.smoothing.entries) == 4
        assert result.agreement.cosine > 0.999
        written = onnx.load(out)
        session(written)  # ONNX Runtime loads it
        # every MatMul gets integer inputs, the activation x activation ones (QK^T, attention . V) included
        producer = {o: n.op_type for n in written.graph.node for o in n.output}
        matmuls = [n for n in written.graph.node if n.op_type == "MatMul"]
        assert len(matmuls) == 8, target  # q, k, v, scores, context, o, up, down
        for node in matmuls:
            assert [producer.get(t) for t in node.input] == ["DequantizeLinear"] * 2, (target, node.name)


def test_dynamic_with_smoothquant_is_refused():
    with pytest.raises(QuantizeError, match="smoothquant"):
        Settings.of(edit(preset("int8"), dynamic=True, smoothquant=0.5))


def test_the_cli_reads_the_flag_and_refuses_a_bad_value(tmp_path, capsys):
    path = models.save(models.attention_block(), tmp_path / "block.onnx")
    np.savez(tmp_path / "calib.npz", **models.attention_feeds(24))
    with pytest.raises(SystemExit):
        main(["quantize", path, "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "q.onnx"),
              "--smoothquant", "1.5"])  # fmt: skip
    assert "'1.5' is neither alpha in [0, 1] (0.5 is usual) nor 'search'" in capsys.readouterr().err
    main(["quantize", path, "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "q.onnx"),
          "--smoothquant", "-q", "--no-compare"])  # fmt: skip
    assert "smoothquant: 4 tensors smoothed" in capsys.readouterr().out
    ranges = (tmp_path / "q.ranges.json").read_text()
    assert '"smoothquant": 0.5' in ranges and '"folded": "Mul gelu"' in ranges


def test_awq_with_an_int4_group_quantizer_protects_the_salient_channels():
    """AWQ with INT4 per group of 4 along K: on inputs with two large channels the error after rounding drops,
    and the weights' scaled rows are the ones of the large channels."""
    rng = np.random.default_rng(8)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], "fc")], _weights(rng, "w"))
    spec = QuantSpec(bits=4, axis=1, group_size=4)

    def int4(w):
        scale, zero = qparams_from_tensor(w, spec)
        return fake_quant(w, scale, zero, spec)

    smoothed, report = smoothing.awq(model, _outlier_feeds(8), int4, progress=False)
    (entry,) = report.entries
    assert entry.exponent > 0 and entry.error < 0.9 * entry.plain_error
    w0, w1 = (numpy_helper.to_array(m.graph.initializer[0]) for m in (model, smoothed))
    ratio = np.abs(w1).max(1) / np.abs(w0).max(1)  # per input channel (the rows of a MatMul's (K, N) weight)
    assert set(np.argsort(ratio)[-2:]) == {1, 5}
    _same_outputs(model, smoothed, _outlier_feeds(2))
