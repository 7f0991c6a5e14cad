"""Recipes as data: to_dict/from_dict with a version, JSON and YAML files."""

from __future__ import annotations

import json

import pytest

from lowbit.errors import SpecError
from lowbit.recipe import FORMAT_VERSION, PRESETS, Config, LayerConfig, from_dict, load, preset, save, to_dict


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips(name):
    data = to_dict(preset(name))
    assert data["lowbit_recipe"] == FORMAT_VERSION
    assert from_dict(json.loads(json.dumps(data))) == preset(name)


def test_a_full_recipe_round_trips_through_json_and_yaml(tmp_path):
    pytest.importorskip("yaml")
    cfg = (
        preset("int8_trt")
        .with_method("percentile", {"percentile": 99.99})
        .override("*classifier*", None)
        .override("features.0", LayerConfig(weight=None))
    )
    cfg = type(cfg)(**{**cfg.__dict__, "exclude_ops": ("Softmax",), "rounding": "nearest", "fp16_rest": True})
    for suffix in (".json", ".yaml"):
        path = save(cfg, tmp_path / f"recipe{suffix}")
        assert load(path) == cfg


def test_a_file_starts_from_a_preset_and_changes_what_it_names(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "r.yaml"
    path.write_text(
        "lowbit_recipe: 1\npreset: int8\ntarget: trt\ndefault:\n  input: {method: entropy}\n"
        "overrides:\n  - {pattern: '*head*', layer: null}\nexclude_ops: [Softmax]\n"
    )
    cfg = load(path)
    assert cfg.target == "trt" and cfg.default.input.method == "entropy"
    assert cfg.default.input.signed is None  # still the target's grid, as in the preset
    assert cfg.default.weight == preset("int8").default.weight
    assert cfg.for_layer("a.head.b") is None and cfg.exclude_ops == ("Softmax",)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"targt": "trt"}, "recipe: unknown key 'targt'; keys: lowbit_recipe, preset, default"),
        ({"lowbit_recipe": 99}, "recipe format 99 is not one this lowbit reads"),
        ({"default": {"input": {"bitz": 4}}}, "default.input: unknown key 'bitz'"),
        ({"default": {"weight": {"bits": 0}}}, "default.weight: bits must be an integer from 1 to 16"),
        ({"overrides": [{"pattern": "x"}]}, r"overrides\[0\] needs a pattern"),
        ({"preset": "int3"}, "unknown quantization preset 'int3'"),
        ([1, 2], "recipe must be a mapping"),
    ],
)
def test_a_bad_recipe_names_the_key_and_what_is_known(data, message):
    with pytest.raises(SpecError, match=message):
        from_dict(data)


def test_a_bad_file_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text("{target: trt")
    with pytest.raises(SpecError, match=r"r.json: not a valid JSON recipe"):
        load(bad)
    with pytest.raises(SpecError, match=r"missing.json: cannot read the recipe"):
        load(tmp_path / "missing.json")
    wrong = tmp_path / "w.json"
    wrong.write_text('{"target": "tpu"}')
    with pytest.raises(SpecError, match=r"w.json: unknown target 'tpu'"):
        load(wrong)


def test_a_yaml_recipe_without_pyyaml_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_yaml(name, *args, **kwargs):
        if name == "yaml":
            raise ImportError("No module named 'yaml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_yaml)
    path = tmp_path / "r.yaml"
    path.write_text("preset: int8\n")
    with pytest.raises(SpecError, match=r"r\.yaml: reading or writing a YAML recipe needs PyYAML: pip install"):
        load(path)


def test_smoothquant_and_act_order_round_trip_and_a_version_2_recipe_still_reads():
    config = Config(smoothquant=0.6, act_order=True, rounding="gptq")
    assert from_dict(to_dict(config)) == config
    assert from_dict(to_dict(Config(smoothquant="search"))).smoothquant == "search"
    old = from_dict({"lowbit_recipe": 2, "preset": "w4a16_group128", "rounding": "gptq"})
    assert old.smoothquant is None and old.act_order is False and old.default.input is None
