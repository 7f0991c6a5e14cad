"""``lowbit quantize --max-drop X --metric KIND``: the kinds it takes, relerr on a one-score-per-sample model."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from lowbit.cli import build_parser, main
from lowbit.onnx import metrics
from tests.onnx.test_metrics import save_score_head


def test_the_metric_option_offers_every_metric_kind():
    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]
    option = next(a for a in quantize._actions if "--metric" in a.option_strings)
    assert tuple(option.choices) == metrics.METRICS
    assert "relerr" in option.help and "SQNR" in option.help


def test_relerr_budget_on_the_command_line(tmp_path, capsys):
    model, calib, evaluation = save_score_head(tmp_path)
    argv = ["quantize", model, "--calib", calib, "--eval", evaluation, "-o", str(tmp_path / "q.onnx"), "-q",
            "--per-tensor", "--max-drop", "0.02", "--metric", "relerr"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mixed precision: relerr FP32 0.0000, budget: drop <= 0.02; within budget with 1 layer(s)" in out
    assert "kept in float: fc1" in out and "SQNR" in out  # the summary sees the error too
    # agreement refuses an output of one value per sample and names the metric that sees its error
    argv[-1] = "agreement"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "use --metric relerr" in err and "Traceback" not in err


def test_an_unknown_metric_is_one_error_line_listing_the_kinds(tmp_path, capsys):
    model, calib, _ = save_score_head(tmp_path)
    argv = ["quantize", model, "--calib", calib, "-o", str(tmp_path / "q.onnx"), "--max-drop", "1", "--metric", "sqnr"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [
        "lowbit quantize: error: argument --metric: invalid choice: 'sqnr' "
        "(choose from 'cosine', 'agreement', 'accuracy', 'relerr')"
    ]
