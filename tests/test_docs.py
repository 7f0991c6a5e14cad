"""The Python examples of docs/EXTENDING.md run as written (in a process of their own: they register a target, a
calibration method and a weight rounding, which must not leak into the other tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

DOC = Path(__file__).resolve().parents[1] / "docs" / "EXTENDING.md"
SETUP = """
from pathlib import Path
import numpy as np
from tests.onnx import models
tmp = Path({tmp!r})
model = models.save(models.convnet(), tmp / "convnet.onnx")
calib = models.calib_data(tmp / "calib.npz", (3, 16, 16))
"""


def test_the_extending_guide_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 5
    script = tmp_path / "guide.py"
    script.write_text(SETUP.format(tmp=str(tmp_path)) + "\n".join(blocks))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert all((tmp_path / f"{name}.onnx").exists() for name in ("npu", "absmax", "tz"))
