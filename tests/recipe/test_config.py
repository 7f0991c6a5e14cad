"""The recipe: validation, presets, resolution against a target, and edits."""

from __future__ import annotations

import pytest

from lowbit.errors import SpecError
from lowbit.recipe import Config, LayerConfig, QuantizerConfig, available_targets, get_target, preset, resolve


def test_a_preset_leaves_the_activation_grid_and_method_to_the_target():
    act = preset("int8").default.input
    assert act.signed is None and act.symmetric is None and act.method is None
    ort, trt, qdq = (resolve(preset("int8"), t).default.input for t in ("ort", "trt", "qdq"))
    assert (ort.signed, ort.symmetric) == (False, False)
    assert (trt.signed, trt.symmetric) == (True, True) == (qdq.signed, qdq.symmetric)
    assert ort.method == trt.method == get_target("ort").default_method == "mse"
    assert resolve(preset("int8_trt"), "ort").target == "trt"  # a recipe's own target wins over the default


def test_an_explicit_grid_is_kept_and_resolving_twice_changes_nothing():
    asym = resolve(preset("w8a8_asym"), "trt")
    assert (asym.default.input.signed, asym.default.input.symmetric) == (False, False)
    once = resolve(preset("int8"), "ort")
    assert resolve(once, "trt") == once


def test_an_unresolved_activation_has_no_spec():
    with pytest.raises(SpecError, match="resolve the Config against a target"):
        preset("int8").default.input.spec(None)
    with pytest.raises(SpecError, match="together"):
        QuantizerConfig(signed=None)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Config(target="tpu"), "unknown target 'tpu'; targets: ort, qdq, trt"),
        (lambda: Config(exclude="conv"), "exclude must be a list of strings"),
        (lambda: Config(fp16_rest="yes"), "fp16_rest must be true or false"),
        (lambda: Config(bias_correction=1), "bias_correction must be"),
        (lambda: Config(refine="adaquant"), "unknown refinement 'adaquant'; refinements: easyquant"),
        (lambda: QuantizerConfig(method="kl"), "unknown calibration method 'kl'"),
        (lambda: QuantizerConfig(bits=17), "bits must be an integer from 1 to 16"),
        (lambda: QuantizerConfig(format="fp9"), "unknown format 'fp9'; formats: int"),
        (lambda: QuantizerConfig(scale="pow3"), "scale must be one of float, pow2"),
        (lambda: QuantizerConfig(rounding="up"), "rounding must be one of nearest, stochastic"),
        (lambda: preset("int9"), "unknown quantization preset 'int9'; presets: int8, "),
        (lambda: Config(smoothquant=1.5), "smoothquant must be alpha, a number in [0, 1]"),
        (lambda: Config(smoothquant="auto"), "smoothquant must be alpha.*or 'search'; got 'auto'"),
        (lambda: Config(act_order="yes"), "act_order must be true or false"),
    ],
)
def test_bad_values_are_one_line_errors_that_name_the_field(make, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make()


def test_edits_reach_the_overrides_and_leave_dynamic_and_float_layers_alone():
    cfg = preset("int8").override("head*", LayerConfig(QuantizerConfig(method="minmax"), None)).override("x", None)
    edited = cfg.with_method("percentile", {"percentile": 99.9}).with_weight_granularity("tensor")
    assert edited.default.input.method == "percentile" and edited.default.input.method_options == {"percentile": 99.9}
    assert edited.for_layer("head1").input.method == "percentile" and edited.for_layer("head1").weight is None
    assert edited.for_layer("x") is None and edited.default.weight.granularity == "tensor"
    dyn = preset("int8_dynamic").with_method("entropy")
    assert dyn.default.input == preset("int8_dynamic").default.input  # dynamic inputs are not calibrated
    assert preset("int8").with_learned_scales().default.input.learn_scale


def test_the_built_in_targets_say_what_they_store():
    assert available_targets() == ["ort", "qdq", "trt"]
    ort, trt, qdq = (get_target(t) for t in ("ort", "trt", "qdq"))
    assert ort.int32_biases and ort.int8_tables and not trt.int32_biases and not qdq.int8_tables
    assert len({ort.placement, trt.placement, qdq.placement}) == 3
    trt.check_activation(trt.activation)
    with pytest.raises(SpecError, match="target 'trt' takes int8 symmetric activations only"):
        trt.check_activation(ort.activation)
    ort.check_activation(trt.activation)  # ONNX Runtime runs int8 activations too
