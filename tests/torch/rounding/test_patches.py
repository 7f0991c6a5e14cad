"""The one conv-patch helper through which both weight roundings read a convolution's input
(lowbit.torch.rounding.patches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import CalibrationError
from lowbit.torch.rounding.patches import conv_geometry, conv_patches, is_pointwise, output_positions
from tests.torch import models

CONVS = {name: layer for name, layer in models.roundable_geometries().items() if not isinstance(layer, nn.Linear)}


@pytest.mark.parametrize("layer", list(CONVS.values()), ids=list(CONVS))
def test_one_conv_patch_helper_serves_both_roundings(layer):
    """Patches at every position (GPTQ's) and gathered at chosen positions (AdaRound's) are the same rows, and
    times the weight they give the layer's output."""
    x = models.layer_input(layer, torch.Generator().manual_seed(2))
    every = conv_patches(layer, x, "test")
    n = output_positions(layer, x, "test")
    assert every.shape[0] == n
    chosen = torch.tensor([0, n // 2, n - 1])
    assert torch.equal(conv_patches(layer, x, "test", chosen), every[chosen])
    g = layer.groups
    w = layer.weight.detach().reshape(g, layer.out_channels // g, -1)
    y = torch.einsum("rgk,gok->rgo", every, w).reshape(n, -1)
    conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
    ref = conv(x, layer.weight.detach(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
    ref = ref.reshape(x.shape[0], layer.out_channels, -1).transpose(1, 2).reshape(n, -1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_geometry_resolves_same_and_valid_and_knows_a_pointwise_convolution():
    assert conv_geometry(nn.Conv2d(4, 4, 3, padding="same", dilation=2), "GPTQ") == ((3, 3), (1, 1), (2, 2), (2, 2))
    assert conv_geometry(nn.Conv1d(4, 4, 5, padding="valid"), "GPTQ") == ((1, 5), (1, 1), (0, 0), (1, 1))
    assert is_pointwise(nn.Conv2d(4, 6, 1), "GPTQ") and is_pointwise(nn.Conv1d(4, 6, 1), "GPTQ")
    assert not is_pointwise(nn.Conv2d(4, 6, 1, stride=2), "GPTQ")
    assert not is_pointwise(nn.Conv2d(4, 6, 1, padding=1), "GPTQ")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, about speed
def test_same_padding_with_an_even_kernel_names_the_rounding():
    with pytest.raises(CalibrationError, match="AdaRound cannot follow padding='same' with an even kernel"):
        conv_geometry(nn.Conv2d(3, 4, 2, padding="same"), "AdaRound")
