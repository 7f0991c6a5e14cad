"""The registry of the PyTorch front end's weight roundings (lowbit.torch.rounding): name -> the function that sets
a calibrated model's weight codes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lowbit.torch as lt
from lowbit.errors import SpecError
from lowbit.torch import rounding
from lowbit.torch.config import RECIPE_ATTRIBUTE
from lowbit.torch.sensitivity import re_roundings
from tests.torch import models


def test_the_methods_come_from_the_registry_and_the_public_functions_are_theirs():
    assert rounding.available() == ["adaround", "awq", "awq+gptq", "gptq", "nearest", "stochastic"]
    assert rounding.get("awq").apply is lt.awq and rounding.get("awq").scales_weights
    assert rounding.get("gptq").apply is lt.gptq and rounding.get("adaround").apply is lt.adaround
    assert rounding.get("adaround").batches_only and not rounding.get("gptq").batches_only
    assert not rounding.get("nearest").needs_data and not rounding.get("stochastic").needs_data
    assert re_roundings() == ("adaround", "gptq")  # a search re-rounds with every method that reads data


def test_an_unknown_name_is_one_line_that_lists_the_names():
    with pytest.raises(
        SpecError, match=r"^rounding must be one of adaround, awq, awq\+gptq, gptq, nearest, stochastic, got 'up'$"
    ):
        rounding.get("up")


@pytest.fixture
def toward_zero():
    """A fourth method, registered as a new file would register it, and taken out again after the test."""
    calls = []

    @rounding.register("toward_zero")
    def toward_zero(model, calib, *, progress=True):
        calls.append(len(calib))
        for name, q in lt.quantizers(model).items():
            if q.is_weight:
                w = model.get_submodule(name.rsplit(".", 1)[0]).weight.detach()
                scale = q.scale.reshape(-1, *[1] * (w.dim() - 1))
                q.set_codes(torch.trunc(w / scale).clamp(q.spec.qmin, q.spec.qmax))
        return []

    yield calls
    del rounding.METHODS["toward_zero"]


def test_a_registered_method_is_taken_by_quantize_and_the_search_by_its_name(toward_zero):
    config = replace(lt.preset("w4a8"), rounding="toward_zero")
    q = lt.quantize(models.convnet(), config, calib=models.batches(), progress=False)
    assert toward_zero == [4] and models.weight_codes(q)
    assert "toward_zero" in rounding.available() and "toward_zero" in re_roundings()
    assert getattr(q, RECIPE_ATTRIBUTE)["rounding"] == "toward_zero"  # the recipe recorded names it


def test_a_name_is_registered_once(toward_zero):
    with pytest.raises(ValueError, match="'toward_zero' is already registered"):
        rounding.register("toward_zero")(lambda model, calib, *, progress=True: None)
