"""Hugging Face transformers models in lowbit.torch: tiny BERT and GPT-2 built from configs in code."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.errors import SpecError
from lowbit.recipe import LayerConfig, QuantizerConfig, from_dict, to_dict
from lowbit.torch.attention import ATTRIBUTE, AttentionQuantizers, quantized_attention
from lowbit.torch.layers import QuantLinear, QuantMixin

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("lowbit.torch.hf")
Conv1D = transformers.pytorch_utils.Conv1D

INT8_ATTENTION = replace(lt.preset("int8"), attention_matmuls=True)


def _bert(seed: int = 0, pooling: bool = False):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    return transformers.BertModel(config, add_pooling_layer=pooling).eval()


def _gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(  # bos and eos inside the tiny vocabulary (transformers warns otherwise)
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _tokens(n: int = 4, length: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length // 2 :] = 0  # a padded sentence
    return {"input_ids": ids, "attention_mask": mask}


def _calib(n: int = 3) -> list[dict[str, torch.Tensor]]:
    return [_tokens(seed=s) for s in range(10, 10 + n)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.fixture(scope="module")
def bert_int8_attention():
    return lt.quantize(_bert(), INT8_ATTENTION, calib=_calib(), progress=False)


@pytest.fixture(scope="module")
def gpt2_int8_attention():
    return lt.quantize(_gpt2(), INT8_ATTENTION, calib=[t["input_ids"] for t in _calib()], progress=False)


def test_every_linear_and_conv1d_becomes_quantized_and_int8_stays_close():
    for model, float_types, calib, run in (
        (_bert(pooling=True), (nn.Linear,), _calib(), lambda m, t: m(**t).last_hidden_state),
        (_gpt2(), (nn.Linear, Conv1D), [t["input_ids"] for t in _calib()], lambda m, t: m(t["input_ids"]).logits),
    ):
        names = {n for n, m in model.named_modules() if isinstance(m, float_types)}
        q = lt.quantize(model, "int8", calib=calib, progress=False)
        swapped = {n for n, m in q.named_modules() if isinstance(m, QuantMixin)}
        assert swapped == names and len(names) >= 9
        assert all(m.input_quantizer.calibrated and m.weight_quantizer.calibrated for m in q.modules()
                   if isinstance(m, QuantMixin))  # fmt: skip
        tokens = _tokens(seed=99)
        with torch.no_grad():
            ref, out = run(model, tokens), run(q, tokens)
        assert _cosine(out, ref) > 0.999
        assert not torch.equal(out, ref)  # it is quantized
        assert not any(isinstance(m, QuantMixin) for m in model.modules())  # the original is untouched


@pytest.mark.parametrize(
    "weight",
    [QuantizerConfig(bits=4, granularity="channel"), QuantizerConfig(bits=4, granularity="group", group_size=8)],
)
def test_conv1d_is_quantized_as_the_linear_layer_it_is(weight):
    """Conv1D's W (in, out) is a Linear's W^T: per output channel and per input group alike."""
    torch.manual_seed(0)
    conv = Conv1D(24, 32)
    nn.init.normal_(conv.bias)
    linear = nn.Linear(32, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    cfg = LayerConfig(input=QuantizerConfig(), weight=weight)
    qc, ql = hf.QuantHFConv1D.from_float(conv, cfg, "c"), QuantLinear.from_float(linear, cfg, "l")
    x = torch.randn(2, 5, 32)
    for layer in (qc, ql):
        layer.calibrate_weight()
        layer.input_quantizer(x)  # calibrate mode: it records the range
        layer.input_quantizer.load_calibration()
    assert torch.equal(qc.weight_quantizer(qc.weight), ql.weight_quantizer(ql.weight).T)
    assert qc.weight_quantizer.scale.numel() == (24 if weight.granularity == "channel" else 24 * 4)
    torch.testing.assert_close(qc(x), ql(x), rtol=1e-5, atol=1e-5)


def _reference_attention(q, k, v, mask, scaling, quantizers):
    """A plain loop over batch and heads, in float64, with each matmul input fake-quantized by hand."""

    def fq(x, quantizer):
        s, z = float(quantizer.scale), float(quantizer.zero_point)
        spec = quantizer.spec
        return (np.clip(np.rint(x / s) + z, spec.qmin, spec.qmax) - z) * s

    q, k, v, mask = (t.double().numpy() for t in (q, k, v, mask))
    out = np.zeros((q.shape[0], q.shape[2], q.shape[1], v.shape[3]))
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = fq(q[b, h], quantizers.query) @ fq(k[b, h].T, quantizers.key) * scaling + mask[b, 0]
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, :, h] = fq(p, quantizers.probs) @ fq(v[b, h], quantizers.value)
    return out


def test_quantized_attention_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, :, :, 3:] = torch.finfo(torch.float32).min  # padding
    module = nn.Module()
    module.add_module(ATTRIBUTE, AttentionQuantizers(QuantizerConfig(bits=4), "attn"))
    for quantizer in getattr(module, ATTRIBUTE).children():  # ranges wider than the data, so that clipping shows too
        quantizer(torch.tensor([-2.0, 0.9]))
        quantizer.load_calibration()
    out, probs = quantized_attention(module, q, k, v, mask, scaling=0.35)
    expected = _reference_attention(q, k, v, mask, 0.35, getattr(module, ATTRIBUTE))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 5))  # the attention weights returned: P itself
    plain, _ = quantized_attention(nn.Module(), q, k, v, mask, scaling=0.35)  # no quantizers: eager attention
    reference = torch.softmax(q @ k.transpose(-1, -2) * 0.35 + mask, -1) @ v
    torch.testing.assert_close(plain, reference.transpose(1, 2))


def test_attention_quantizers_exist_and_calibrate_only_when_asked(bert_int8_attention, gpt2_int8_attention):
    plain = lt.quantize(_bert(), "int8", calib=_calib(), progress=False)
    assert not any(isinstance(m, AttentionQuantizers) for m in plain.modules())
    for model in (bert_int8_attention, gpt2_int8_attention):
        attention = hf.attention_modules(model)
        assert len(attention) == 2
        for name, module in attention.items():
            quantizers = getattr(module, ATTRIBUTE)
            for kind in AttentionQuantizers.INPUTS:
                q = getattr(quantizers, kind)
                assert q.name == f"{name}.{kind}" and q.mode == "quantize" and q.scale.numel() == 1
        assert model.config._attn_implementation == hf.IMPLEMENTATION
    # The float model keeps its attention; a weight-only config has no input config: nothing to quantize.
    original = _bert()
    weight_only = lt.quantize(original, replace(lt.preset("w4a16_group128"), attention_matmuls=True))
    assert not any(isinstance(m, AttentionQuantizers) for m in weight_only.modules())
    assert original.config._attn_implementation != hf.IMPLEMENTATION


def test_attention_quantizers_change_the_output_only_a_little(bert_int8_attention):
    tokens = _tokens(seed=99)
    with torch.no_grad():
        with_attention = bert_int8_attention(**tokens).last_hidden_state
        for m in bert_int8_attention.modules():
            if isinstance(m, AttentionQuantizers):
                for q in m.children():
                    q.mode = "disabled"
        without = bert_int8_attention(**tokens).last_hidden_state
        for m in bert_int8_attention.modules():
            if isinstance(m, AttentionQuantizers):
                for q in m.children():
                    q.mode = "quantize"
        plain = lt.quantize(_bert(), "int8", calib=_calib(), progress=False)(**tokens).last_hidden_state
    torch.testing.assert_close(without, plain)  # quantizers off: exactly the model without them
    assert _cosine(with_attention, without) > 0.999 and not torch.equal(with_attention, without)


def _attention_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMuls of two activations: both inputs depend on a graph input (a weight's depend on none)."""
    varying = {i.name for i in model.graph.input}
    for node in model.graph.node:  # in topological order
        if any(i in varying for i in node.input):
            varying.update(node.output)
    return [n for n in model.graph.node if n.op_type == "MatMul" and all(i in varying for i in n.input)]


def test_bert_exports_with_qdq_on_both_inputs_of_both_attention_matmuls(bert_int8_attention, tmp_path):
    tokens = _tokens()
    path = hf.export_onnx(bert_int8_attention, tokens, tmp_path / "bert.onnx")
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 12 + 2 * 4  # 12 Linear inputs, 4 matmul inputs in each of 2 attentions
    producers = {o: n for n in model.graph.node for o in n.output}
    matmuls = _attention_matmuls(model)
    assert len(matmuls) == 4
    assert all(producers[i].op_type == "DequantizeLinear" for n in matmuls for i in n.input)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    longer = _tokens(n=3, length=13, seed=5)  # batch and sequence are dynamic
    for feed in (tokens, longer):
        got = sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        with torch.no_grad():
            expected = bert_int8_attention(**feed).last_hidden_state.numpy()
        valid = feed["attention_mask"].numpy().astype(bool)  # padded positions are not compared
        # same codes; float sums in another order may flip a code: a small fraction of the output's range
        assert np.abs(got - expected)[valid].max() < 0.02 * np.abs(expected).max()


def test_gpt2_exports_input_ids_to_logits(gpt2_int8_attention, tmp_path):
    ids = _tokens()["input_ids"]
    path = hf.export_onnx(gpt2_int8_attention, {"input_ids": ids}, tmp_path / "gpt2.onnx")
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input_ids"] and model.graph.output[0].name == "logits"
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 2 * 4 + 1 + 2 * 4  # + the head
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        expected = gpt2_int8_attention(ids).logits.numpy()
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
    assert "lowbit.recipe" in {p.key for p in model.metadata_props}


def test_a_tied_lm_head_is_quantized_and_the_embedding_table_is_not(gpt2_int8_attention):
    original = _gpt2()
    assert original.lm_head.weight is original.transformer.wte.weight  # tied
    q = gpt2_int8_attention
    assert isinstance(q.lm_head, QuantLinear) and q.lm_head.weight_quantizer.calibrated
    assert q.lm_head.weight is not q.transformer.wte.weight
    assert torch.equal(q.transformer.wte.weight, original.transformer.wte.weight)  # float, unchanged
    assert not torch.equal(q.lm_head.weight_quantizer(q.lm_head.weight), q.transformer.wte.weight)


def test_a_model_loaded_from_a_local_folder_quantizes(tmp_path):
    model = _bert()
    model.save_pretrained(tmp_path)
    loaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    a = lt.quantize(model, INT8_ATTENTION, calib=_calib(), progress=False)
    b = lt.quantize(loaded, INT8_ATTENTION, calib=_calib(), progress=False)
    tokens = _tokens(seed=99)
    with torch.no_grad():
        torch.testing.assert_close(b(**tokens).last_hidden_state, a(**tokens).last_hidden_state)


def test_attention_matmuls_is_recorded_and_refused_where_it_cannot_work(bert_int8_attention):
    assert bert_int8_attention.lowbit_recipe["attention_matmuls"] is True
    assert from_dict(to_dict(INT8_ATTENTION)).attention_matmuls is True
    assert from_dict({"lowbit_recipe": 3, "preset": "int8"}).attention_matmuls is False  # older files still read
    mlp = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(SpecError, match="attention_matmuls"):
        lt.quantize(mlp, INT8_ATTENTION, calib=[torch.randn(2, 4)], progress=False)
    with pytest.raises(SpecError, match="attention_matmuls must be true or false"):
        replace(INT8_ATTENTION, attention_matmuls="yes")
    # A pattern that names only an attention module is a pattern over quantizable things.
    cfg = INT8_ATTENTION.override("encoder.layer.0.attention.self", LayerConfig(input=None))
    q = lt.quantize(_bert(), cfg, calib=_calib(), progress=False)
    assert [n for n, m in q.named_modules() if isinstance(m, AttentionQuantizers)] == [
        f"encoder.layer.1.attention.self.{ATTRIBUTE}"
    ]


def test_awq_says_which_conv1d_layers_it_cannot_scale():
    model = _gpt2()
    ids = [torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))]
    with pytest.warns(UserWarning, match=r"AWQ scales the inputs of nn.Linear layers only; \d+ other .*c_attn"):
        lt.quantize(model, "w4a16_group128", calib=ids, rounding="awq", progress=False)
