"""Block-by-block calibration (lowbit.torch.blockwise) under GPTQ, AWQ and SmoothQuant."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import lowbit.torch as lt
from lowbit.errors import CalibrationError
from lowbit.recipe import Config, LayerConfig, QuantizerConfig, preset
from lowbit.torch.blockwise import capture_inputs, find_blocks, in_blocks, resolve_blocks, whole_model, without_cache
from tests.torch import models
from tests.torch.transformer_models import TinyGPT, tokens

W4 = Config(LayerConfig(None, QuantizerConfig(bits=4, granularity="group", group_size=16)))


def codes(q: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.codes.clone() for n, m in lt.quantizers(q).items() if m.is_weight and m.has_codes}


def test_blocks_are_the_longest_module_list_of_one_class():
    assert find_blocks(TinyGPT(n_blocks=3)) == ["blocks.0", "blocks.1", "blocks.2"]
    assert find_blocks(models.MLP()) == []
    assert resolve_blocks(TinyGPT(), False) == []
    assert resolve_blocks(TinyGPT(), ["blocks.1"]) == ["blocks.1"]
    with pytest.raises(CalibrationError, match=r"blocks: layers\.0 is not a submodule"):
        resolve_blocks(TinyGPT(), ["layers.0"])


def test_the_first_block_inputs_are_captured_with_their_keyword_arguments():
    model, calib = TinyGPT(), tokens(3)
    captured = capture_inputs(model, model.blocks[0], calib, progress=False)
    assert len(captured) == 3
    (h,), kwargs = captured[1]
    torch.testing.assert_close(h, model.embed(calib[1]))
    assert kwargs["mask"].dtype == torch.bool and kwargs["mask"].shape == (16, 16)


def test_each_part_is_processed_once_and_the_layers_outside_blocks_last():
    q = lt.quantize(TinyGPT(), W4, tokens(2), progress=False)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, lt.QuantLinear)}
    parts = []
    in_blocks(q, tokens(2), layers, lambda part, data: parts.append(sorted(part)) or list(part), progress=False)
    assert parts == [
        sorted(n for n in layers if n.startswith("blocks.0.")),
        sorted(n for n in layers if n.startswith("blocks.1.")),
        ["embed", "head"],
    ]


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_block_by_block_on_float_inputs_gives_the_codes_of_one_pass(act_order):
    model, calib = TinyGPT(), tokens(4)
    q1 = lt.quantize(model, W4, calib, progress=False)
    lt.gptq(q1, calib, blocks=False, act_order=act_order, progress=False)
    q2 = lt.quantize(model, W4, calib, progress=False)
    lt.gptq(q2, iter(calib), quantized_inputs=False, act_order=act_order, progress=False)  # a one-shot iterator too
    one, blockwise = codes(q1), codes(q2)
    assert len(one) == 12 and one.keys() == blockwise.keys()  # fc2 (64 inputs) saw too few rows for GPTQ
    for name, c in one.items():
        torch.testing.assert_close(blockwise[name], c, rtol=0, atol=0)


def test_gptq_block_by_block_on_quantized_inputs_sees_the_error_upstream():
    """The default (GPTQ's sequential setting): the second block's codes differ from one pass's, the first
    block's (float upstream) do not; both lower the error of plain rounding."""
    model, calib, test = TinyGPT(), tokens(4), tokens(2, seed=5)
    qs = {k: lt.quantize(model, replace(W4, blockwise=k != "one"), calib, rounding=r, progress=False)
          for k, r in (("one", "gptq"), ("blocks", "gptq"), ("nearest", "nearest"))}  # fmt: skip
    one, seq = codes(qs["one"]), codes(qs["blocks"])
    assert all(torch.equal(seq[n], one[n]) for n in one if n.startswith("blocks.0."))
    assert any(not torch.equal(seq[n], one[n]) for n in one if n.startswith("blocks.1."))
    with torch.no_grad():
        err = {k: sum(float(((q(x) - model(x)) ** 2).mean()) for x in test) for k, q in qs.items()}
    assert err["blocks"] < err["nearest"] and err["one"] < err["nearest"]


@pytest.mark.parametrize("rounding", ["awq", "smoothquant"])
def test_awq_and_smoothquant_block_by_block_give_the_weights_of_one_pass(rounding):
    model, calib = TinyGPT(), tokens(3)
    out = []
    for blockwise in (False, True):
        if rounding == "awq":
            q = lt.quantize(model, replace(W4, blockwise=blockwise), calib, rounding="awq", progress=False)
        else:
            cfg = replace(preset("int8").with_method("minmax"), smoothquant=0.5, blockwise=blockwise)
            q = lt.quantize(model, cfg, calib, progress=False)
        out.append({k: v.clone() for k, v in q.state_dict().items()})
    assert out[0].keys() == out[1].keys()
    for k, v in out[0].items():
        torch.testing.assert_close(out[1][k], v, rtol=1e-5, atol=1e-6, msg=k)


class NormBetween(TinyGPT):
    """Blocks with a LayerNorm between them: not a chain."""

    def __init__(self):
        super().__init__()
        self.mid = nn.LayerNorm(32)

    def forward(self, x):
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        h = self.blocks[0](self.embed(x), mask=mask)
        return self.head(self.ln_f(self.blocks[1](self.mid(h), mask=mask)))


def test_blocks_that_are_not_a_chain_are_calibrated_in_one_pass_with_a_warning():
    model, calib = NormBetween().eval(), tokens(2)
    q1 = lt.quantize(model, replace(W4, blockwise=False), calib, rounding="gptq", progress=False)
    with pytest.warns(UserWarning, match="do not pass their output straight to the next one"):
        q2 = lt.quantize(model, W4, calib, rounding="gptq", progress=False)
    for name, c in codes(q1).items():
        torch.testing.assert_close(codes(q2)[name], c, rtol=0, atol=0)


def test_whole_model_data_runs_a_forward_loop_too():
    model, calib = TinyGPT(), tokens(2)
    seen = []
    hook = model.head.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    whole_model(model, lambda m: [m(x) for x in calib], "test", False).run()
    hook.remove()
    assert len(seen) == 2


def test_a_transformers_decoder_with_padding_runs_block_by_block_without_its_cache():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0  # padded: a cache shared across calls would not fit the next batch
    calib = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:, :9], "attention_mask": mask[:, :9]}]
    cfg = lt.preset("w4a16_group128").override("*", lt.LayerConfig(None, lt.QuantizerConfig(
        bits=4, granularity="group", group_size=16)))  # fmt: skip
    q = lt.quantize(model, cfg, calib=calib, rounding="gptq", progress=False)
    with torch.no_grad():
        a, b = model(**calib[0]).logits, q(**calib[0]).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95
    args, kwargs = without_cache(
        (torch.ones(1), transformers.DynamicCache()), {"past_key_values": 1, "use_cache": True}
    )
    assert args[1] is None and kwargs == {"past_key_values": None, "use_cache": False}
