"""lowbit's entropy threshold against NVIDIA ModelOpt's own ``_compute_amax_entropy``, where the benchmarks' ModelOpt
environment is installed (benchmarks/.venv-modelopt, see benchmarks/modelopt_peer.py); skipped elsewhere."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lowbit.calib.search import entropy_bins

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / "benchmarks" / ".venv-modelopt" / "bin" / "python"

pytestmark = pytest.mark.skipif(not PYTHON.exists(), reason="ModelOpt's environment (benchmarks/.venv-modelopt) absent")


def test_thresholds_equal_modelopts_on_the_same_histograms(tmp_path):
    rng = np.random.default_rng(5)
    data = {
        "halfnormal": np.abs(rng.standard_normal(100_000)),
        "relu": np.maximum(rng.standard_normal(100_000), 0),
        "mixture": np.r_[rng.normal(0, 1, 100_000), rng.normal(6, 0.5, 10_000)],
        "laplace": rng.laplace(size=100_000),
        "sparse": np.r_[np.zeros(50_000), rng.exponential(size=3_000)],
    }
    arrays = {}
    for name, x in data.items():
        a = np.abs(x)
        arrays[f"hist_{name}"], arrays[f"edges_{name}"] = np.histogram(a, bins=2048, range=(0, a.max()))
    np.savez(tmp_path / "in.npz", **arrays)
    subprocess.run(
        [str(PYTHON), str(ROOT / "benchmarks" / "modelopt_entropy.py"), str(tmp_path / "in.npz"), str(tmp_path / "o")],
        check=True,
        timeout=600,
    )
    theirs = json.loads((tmp_path / "o").read_text())
    for name in data:
        edges = arrays[f"edges_{name}"]
        assert entropy_bins(arrays[f"hist_{name}"]) == round(theirs[name]["amax"] / (edges[1] - edges[0])), name
