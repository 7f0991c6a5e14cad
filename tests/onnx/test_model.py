"""Loading and preparing models (lowbit.onnx.model): what preprocessing leaves of the graph."""

from __future__ import annotations

import pytest

from lowbit.onnx.model import preprocess
from tests.onnx import models


@pytest.fixture(scope="module")
def convnet():
    return preprocess(models.convnet())


def test_preprocess_folds_batchnorm_into_conv(convnet):
    ops = [n.op_type for n in convnet.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 2
