"""The house rules of DESIGN.md, measured on src/lowbit by tools/house.py: they hold, or this fails and says where."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("house", ROOT / "tools" / "house.py")
house = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(house)
MODULES = house.modules()


def test_no_import_circles():
    assert house.circles(MODULES) == []


def test_no_private_name_is_imported_from_another_module():
    assert house.private_imports(MODULES) == []


def test_only_the_targets_own_files_compare_a_target_name():
    assert house.target_comparisons(MODULES) == []


def test_no_function_over_80_lines():
    assert house.long_functions(MODULES, 80) == []


def test_core_calib_and_recipe_import_neither_torch_nor_onnx():
    assert house.framework_imports(MODULES) == []


def test_the_onnx_entry_points_take_at_most_8_parameters():
    pytest.importorskip("onnxruntime")
    import lowbit.onnx

    for fn in (lowbit.onnx.quantize, lowbit.onnx.analyze):
        assert len(inspect.signature(fn).parameters) <= 8, fn.__name__


def test_the_measures_see_what_they_look_for(tmp_path, monkeypatch):
    """A circle, a private import, a target comparison and a long function planted in a copy are found."""
    pkg = tmp_path / "lowbit"
    (pkg / "recipe").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "recipe" / "__init__.py").write_text("import torch\n")
    (pkg / "a.py").write_text("from lowbit.b import _hidden\n")
    (pkg / "b.py").write_text("from lowbit import a\n_hidden = 1\nok = 'trt' == 'x'\n")
    (pkg / "c.py").write_text("def f():\n" + "    x = 1\n" * 90)
    monkeypatch.setattr(house, "ROOT", tmp_path)
    mods = house.modules()
    assert house.circles(mods) == [["lowbit.a", "lowbit.b"]]
    assert house.private_imports(mods) == ["lowbit/a.py:1 _hidden"]
    assert house.target_comparisons(mods) == ["lowbit/b.py:3"]
    assert house.long_functions(mods)[0][0] == 91
    assert house.framework_imports(mods) == ["lowbit/recipe/__init__.py:1 torch"]
