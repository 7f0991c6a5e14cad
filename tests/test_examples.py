"""The offline example's torch-free checkpoint reader."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lowbit.errors import FormatError
from lowbit.examples import read_state_dict


def test_read_state_dict_without_torch(tmp_path):
    state = read_state_dict(Path(__file__).parent / "data" / "tiny_state_dict.pth")
    np.testing.assert_array_equal(state["layer.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(state["layer.bias"], [0.5, -1.5])
    assert state["steps"] == 7 and state["steps"].dtype == np.int64
    np.testing.assert_array_equal(state["t"], np.arange(6, dtype=np.float32).reshape(2, 3).T)  # strided view
    (tmp_path / "x.pth").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="not a PyTorch zip checkpoint"):
        read_state_dict(tmp_path / "x.pth")


def test_read_state_dict_refuses_arbitrary_classes(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(os.getcwd))  # a GLOBAL that is not part of a state dict
    with pytest.raises(FormatError, match="refusing to unpickle"):
        read_state_dict(path)
