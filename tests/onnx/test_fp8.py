"""The ONNX front end and FP8: refused in one line that says where FP8 is built (lowbit.torch's export)."""

import pytest

from lowbit.onnx.settings import QuantizeError, Settings
from lowbit.recipe import preset


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_fp8_recipes_are_refused_naming_the_format(name):
    with pytest.raises(QuantizeError, match=r"format 'fp8_e[45]m[32]': the ONNX front end builds integer Q/DQ only"):
        Settings.of(preset(name))


def test_int8_recipes_still_build():
    assert Settings.of(preset("int8")).activation.format == "int"
