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


@pytest.mark.parametrize("name", ["tiny_state_dict.pth", "tiny_state_dict_legacy.pth"])  # zip / pre-1.6 format
def test_read_state_dict_without_torch(tmp_path, name):
    state = read_state_dict(Path(__file__).parent / "data" / name)
    np.testing.assert_array_equal(state["layer.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(state["layer.bias"], [0.5, -1.5])
    assert state["steps"] == 7 and state["steps"].dtype == np.int64
    np.testing.assert_array_equal(state["t"], np.arange(6, dtype=np.float32).reshape(2, 3).T)  # strided view
    (tmp_path / "x.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match="not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "x.pth")


def test_read_state_dict_refuses_arbitrary_classes(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(os.getcwd))  # a GLOBAL that is not part of a state dict
    with pytest.raises(FormatError, match="refusing to unpickle"):
        read_state_dict(path)
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, os.getcwd):
            pickle.dump(obj, f)
    with pytest.raises(FormatError, match="refusing to unpickle"):
        read_state_dict(legacy)


def test_read_state_dict_truncated_legacy_file(tmp_path):
    data = (Path(__file__).parent / "data" / "tiny_state_dict_legacy.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-8])
    with pytest.raises(FormatError, match=r"truncated|not a readable"):
        read_state_dict(tmp_path / "cut.pth")
