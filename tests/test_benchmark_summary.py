"""The summary `python -m benchmarks` puts at the top of BENCHMARKS.md, built from the benchmarks' JSON figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def suite(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("LOWBIT_BENCH_DOCS", str(tmp_path))
    for name in ("_common", "benchmarks_main"):
        sys.modules.pop(name, None)
    spec = importlib.util.spec_from_file_location("benchmarks_main", ROOT / "benchmarks" / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("_common", None)


def _row(metric: float, ms8: float, size: float = 1.0, **extra) -> dict:
    return {"top1_agreement": metric, "latency_ms": {"1": ms8 / 4, "8": ms8}, "size_mb": size, **extra}


def test_summary_says_where_lowbit_leads_and_trails_and_reports_failed_peers(suite, tmp_path):
    onnx = {
        "machine": {"date": "2026-11-22"},
        "summary": "targets line",
        "models": {
            "Net A": {
                "rows": {
                    "FP32": {"latency_ms": {"8": 40.0}, "size_mb": 4.0},
                    "lowbit mse (default)": _row(0.95, 20.0),
                    "ORT quantize_static defaults": _row(0.80, 25.0),
                    "ModelOpt": {"error": "ImportError: no CUDA"},
                }
            },
            "Net B": {
                "rows": {
                    "FP32": {"latency_ms": {"8": 40.0}, "size_mb": 4.0},
                    "lowbit mse (default)": _row(0.90, 30.0),
                    "ORT quantize_static best": _row(0.92, 20.0),
                }
            },
        },
    }
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "onnx.json").write_text(json.dumps(onnx))
    (tmp_path / "BENCHMARKS.md").write_text("# title\n\nintro\n\n<!-- onnx:start -->\nx\n<!-- onnx:end -->\n")
    text = suite.write_summary(tmp_path)
    leads = text.split("**Where lowbit leads**")[1].split("**Where lowbit trails**")[0]
    trails = text.split("**Where lowbit trails**")[1]
    assert "Net A: top-1 agreement with FP32 95.00% vs 80.00%" in leads and "+15.00 points" in leads
    assert "Net A: batch 8 runs in 20.0 ms vs 25.0 ms" in leads
    assert "Net B: top-1 agreement with FP32 90.00% vs 92.00%" in trails and "-2.00 points" in trails
    assert "Net B: batch 8 runs in 30.0 ms vs 20.0 ms" in trails
    assert "peer ModelOpt failed (ImportError: no CUDA)" in trails
    doc = (tmp_path / "BENCHMARKS.md").read_text()
    # the summary goes first, under the title; the sections stay
    assert doc.index("<!-- summary:start -->") < doc.index("<!-- onnx:start -->")
    assert doc.startswith("# title\n\n<!-- summary:start -->") and "intro" in doc


def test_the_suite_says_what_the_machine_lacks_and_the_one_command_that_installs_it(suite, tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "FASHION", tmp_path / "no-fashion-mnist")
    monkeypatch.setitem(suite.NEEDS, "qat-bn", ("no_such_module_for_lowbit", "numpy", "fashion-mnist"))
    assert suite.missing(["qat-bn"]) == ["no_such_module_for_lowbit", "fashion-mnist"]
    monkeypatch.setattr(sys, "argv", ["python -m benchmarks", "--only", "qat-bn"])
    with pytest.raises(SystemExit, match=r"lacks no_such_module_for_lowbit, fashion-mnist .*\n  pip install torch"):
        suite.main()
    assert not (tmp_path / "BENCHMARKS.md").exists()  # nothing ran, nothing was written
