"""Bad input to ``lowbit quantize``/``analyze`` as a hostile tester gives it: nothing lost, nothing silently wrong,
one-line errors (issue 23). Inputs are compared byte for byte before and after."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from lowbit import sampling
from lowbit.cli import main
from lowbit.data import InputSpec, open_feeds
from lowbit.onnx import Budget, Options
from lowbit.onnx.analyze import Reporting
from lowbit.onnx.pipeline import quantize
from lowbit.onnx.placement import ExclusionError
from lowbit.onnx.settings import edit
from lowbit.paths import PathError, check_outputs
from lowbit.recipe import preset
from tests.onnx import models


@pytest.fixture
def files(tmp_path):
    model = models.save(models.convnet(), tmp_path / "m.onnx")
    calib = models.calib_data(tmp_path / "c.npz", (3, 16, 16))
    evald = models.calib_data(tmp_path / "e.npz", (3, 16, 16), n=16, seed=2)
    return tmp_path, model, calib, evald


def _digest(*paths) -> list[str]:
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def _error_line(capsys) -> str:
    """The one error line on stderr, checked to start a line of its own on a terminal: any progress bar before it
    on the same line was cleared (only spaces between carriage returns)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.split("\n") if "error:" in line]
    assert len(lines) == 1, err
    *before, visible = lines[0].split("\r")
    assert visible.startswith("lowbit ") and (not before or not before[-1].strip()), repr(lines[0])
    return visible


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "{calib}"], "-o {calib} is the same file as --calib"),
        (["-o", "{tmp}/out/t.onnx", "--target", "trt", "--trt-cache", "{calib}"], "--trt-cache {calib} is the same"),
        (["-o", "{eval}", "--eval", "{eval}"], "-o {eval} is the same file as --eval"),
        (["-o", "{tmp}/q.onnx", "--trt-cache", "{tmp}/q.onnx"], "--trt-cache {tmp}/q.onnx is also given as -o"),
        (["-o", "{tmp}"], "is a folder"),
        (["-o", "{calib}/x.onnx"], "is a file, not a folder"),
    ],
)
def test_outputs_never_land_on_inputs_or_each_other(files, capsys, extra, message):
    tmp, model, calib, evald = files
    fill = {"calib": calib, "eval": evald, "tmp": str(tmp)}
    argv = ["quantize", model, "--calib", calib, "-q", *[a.format(**fill) for a in extra]]
    watched = [model, calib, evald]
    before = _digest(*watched)
    assert main(argv) == 2
    assert message.format(**fill) in _error_line(capsys)
    assert _digest(*watched) == before
    assert not (tmp / "out").exists() and not (tmp / "q.onnx").exists()


def test_analyze_outputs_never_land_on_the_data(files, capsys):
    _tmp, model, calib, _ = files
    before = _digest(calib)
    for flag in ("--report", "--json"):
        assert main(["analyze", model, "--calib", calib, flag, calib, "-q"]) == 2
        assert f"{flag} {calib} is the same file as --calib" in _error_line(capsys)
    assert _digest(calib) == before


def test_an_output_inside_a_data_folder_is_refused(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "x.npy", np.zeros((4, 3), np.float32))
    with pytest.raises(PathError, match="lies inside calib"):
        check_outputs({"output": folder / "m.onnx"}, {"calib": folder})


def test_symlinked_outputs_are_seen_through(tmp_path):
    data = tmp_path / "c.npz"
    np.savez(data, x=np.zeros(3))
    (tmp_path / "link.npz").symlink_to(data)
    with pytest.raises(PathError, match="same file as calib"):
        check_outputs({"output": tmp_path / "link.npz"}, {"calib": str(data)})


def test_an_unwritable_folder_is_refused_before_any_work(files, capsys, monkeypatch):
    tmp, model, calib, _ = files
    out = tmp / "ro" / "q.onnx"
    out.parent.mkdir()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("lowbit.paths.tempfile.mkstemp", denied)  # as root, chmod would not stop a write

    def never(*args, **kwargs):
        raise AssertionError("calibration started before the output was checked")

    monkeypatch.setattr("lowbit.onnx.stages.calibrate_model", never)
    assert main(["quantize", model, "--calib", calib, "-o", str(out), "-q"]) == 2
    assert f"-o {out}: cannot write in {out.parent} (Permission denied)" in _error_line(capsys)
    with pytest.raises(PathError, match="cannot write in"):
        quantize(model, out, calib, "int8", options=Options(progress=False))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--exclude", "("], "argument --exclude: '(' is not a valid regular expression"),
        (["--exclude", "^/head/"], "exclude (--exclude) '^/head/' matches no node"),
        (["--exclude-op", "Convv"], "exclude_ops (--exclude-op) 'Convv': the model has no node of that type"),
        (["--max-drop", "-1"], "argument --max-drop: the largest drop allowed is 0 or more"),
        (["--max-samples", "0"], "argument --max-samples: must be 1 or more"),
        (["--batch-size", "-3"], "argument --batch-size: must be 1 or more"),
        (["--image-size", "0"], "argument --image-size: must be 1 or more"),
    ],
)
def test_options_that_mean_nothing_are_refused(files, capsys, extra, message):
    tmp, model, calib, _ = files
    argv = ["quantize", model, "--calib", calib, "-o", str(tmp / "q.onnx"), "-q", *extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own check: usage, then one error line
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp / "q.onnx").exists()


def test_python_api_refuses_the_same(files):
    tmp, model, calib, _ = files
    with pytest.raises(ExclusionError, match="matches no node"):
        quantize(
            model, tmp / "q.onnx", calib, edit(preset("int8"), exclude=["^/head/"]), options=Options(progress=False)
        )
    with pytest.raises(ExclusionError, match="not a valid regular expression"):
        quantize(model, tmp / "q.onnx", calib, edit(preset("int8"), exclude=["("]), options=Options(progress=False))
    with pytest.raises(ValueError, match="max_drop must be 0 or more"):
        quantize(model, tmp / "q.onnx", calib, "int8", budget=Budget(object(), -1), options=Options(progress=False))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        quantize(model, tmp / "q.onnx", calib, "int8", options=Options(batch_size=0, progress=False))
    assert not (tmp / "q.onnx").exists()


def test_evaluation_data_is_checked_before_anything_is_written(files, capsys):
    tmp, model, calib, _ = files
    bad = models.calib_data(tmp / "bad.npz", (3, 8, 8), n=16)
    assert main(["quantize", model, "--calib", calib, "--eval", bad, "-o", str(tmp / "q.onnx"), "-q"]) == 2
    assert "axis 2 differs" in _error_line(capsys)
    assert not (tmp / "q.onnx").exists() and not (tmp / "q.ranges.json").exists()


def test_nan_in_the_evaluation_data_is_refused_before_writing(files, capsys):
    tmp, model, calib, evald = files
    x = np.load(evald)["x"]
    x[5, 0, 0, 0] = np.nan
    np.savez(tmp / "nan.npz", x=x)
    assert main(["quantize", model, "--calib", calib, "--eval", str(tmp / "nan.npz"), "-o", str(tmp / "q.onnx")]) == 2
    line = _error_line(capsys)
    assert "NaN" in line and "nan.npz" in line
    assert not (tmp / "q.onnx").exists()


def test_interrupt_says_what_was_written(files, capsys, monkeypatch):
    tmp, model, calib, _ = files
    out = tmp / "q.onnx"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lowbit.onnx.stages.calibrate_model", interrupted)
    assert main(["quantize", model, "--calib", calib, "-o", str(out), "-q"]) == 130
    assert capsys.readouterr().err.strip() == "lowbit quantize: interrupted; nothing was written"

    monkeypatch.undo()
    monkeypatch.setattr("lowbit.onnx.pipeline.compare.agreement", interrupted)  # after the model was written
    assert main(["quantize", model, "--calib", calib, "-o", str(out), "-q"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; already written: " in err and str(out) in err and "q.ranges.json" in err
    assert "Traceback" not in err


def test_unexpected_failures_are_one_line_and_debug_shows_the_traceback(files, capsys, monkeypatch):
    tmp, model, calib, _ = files

    def broken(*args, **kwargs):
        raise RuntimeError("deep inside a library")

    monkeypatch.setattr("lowbit.onnx.stages.calibrate_model", broken)
    argv = ["quantize", model, "--calib", calib, "-o", str(tmp / "q.onnx"), "-q"]
    assert main(argv) == 1
    line = _error_line(capsys)
    assert "unexpected RuntimeError: deep inside a library" in line and "--debug" in line
    assert main([*argv, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_tiny_calibration_set_is_warned_about(files, capsys):
    tmp, model, _, _ = files
    tiny = models.calib_data(tmp / "tiny.npz", (3, 16, 16), n=3)
    assert main(["quantize", model, "--calib", tiny, "-o", str(tmp / "q.onnx"), "-q"]) == 0
    captured = capsys.readouterr()
    assert "only 3 calibration samples" in captured.err
    assert "too few to hold any out" in captured.err and "--eval" in captured.err


def test_the_summary_counts_layers_and_says_what_its_figures_are(files, capsys):
    tmp, model, calib, evald = files
    assert main(["quantize", model, "--calib", calib, "--eval", evald, "-o", str(tmp / "q.onnx"), "-q"]) == 0
    out = capsys.readouterr().out
    # conv1, conv2, add, gap, fc, as `lowbit analyze` counts layers; the Relu, MaxPool, Flatten ride along
    assert "quantized 5 layers for ort (static, mse calibration; with the 4 nodes that follow them, 9 nodes)" in out
    assert "calibration on 48 of 48 samples" in out
    assert "GPTQ rounding on 2 layers" in out  # a plural that agrees
    assert "max abs error" in out and "in the output's units" in out
    assert "done in" in out


def test_fixed_batch_models_say_why_a_batch_was_not_timed_and_search_at_their_batch(tmp_path, capsys):
    model = models.convnet()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    path = models.save(model, tmp_path / "b1.onnx")
    calib = models.calib_data(tmp_path / "c.npz", (3, 16, 16), n=40)
    argv = ["quantize", path, "--calib", calib, "-o", str(tmp_path / "q.onnx"), "-q", "--max-drop", "0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(- at batch 8: the model's batch size is fixed at 1)" in out
    assert "at batch 8 (through a copy of the model with a free batch size; the model fixes it at 1)" in out
    assert onnx.load(tmp_path / "q.onnx").graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_calibration_and_held_out_samples_spread_over_ordered_data():
    n = 100
    x = np.arange(n, dtype=np.float32)[:, None]
    source = open_feeds({"x": x}, [InputSpec("x", np.float32, (None, 1))])
    split = sampling.split(source, max_samples=40, holdout=10)
    calib = np.concatenate([f["x"][:, 0] for f in split.calib.batches(8)])
    held = np.concatenate([f["x"][:, 0] for f in split.held.batches(8)])
    assert len(calib) == 40 and len(held) == 10 and not set(calib) & set(held)
    for chosen in (calib, held):  # both reach the tail of an ordered file, not just its head
        assert chosen.min() < n / 4 and chosen.max() >= 3 * n / 4
    again = sampling.split(source, max_samples=40, holdout=10)
    assert np.array_equal(calib, np.concatenate([f["x"][:, 0] for f in again.calib.batches(8)]))  # seeded
    assert "40 of 100 samples, 10 others held out" in split.describe()


class _Outputs:
    """A stand-in session that returns fixed outputs, to score a metric on chosen values."""

    def __init__(self, outputs):
        self.outputs = iter(outputs)

    def get_outputs(self):
        return [type("Out", (), {"name": "y"})()]

    def run(self, names, feed):
        return [next(self.outputs)]


def test_a_budget_never_counts_nan_outputs_as_agreement():
    from lowbit.onnx.metrics import OutputMetric

    ref = np.eye(4, dtype=np.float32)
    broken = ref.copy()
    broken[1:] = np.nan  # argmax of a NaN row is 0, which used to "agree" with row 0's class
    feeds = [{"x": np.zeros((4, 1), np.float32)}]
    for kind, expected in (("agreement", 25.0), ("cosine", 0.25)):
        metric = OutputMetric(kind, feeds)
        metric.prepare(_Outputs([ref]))
        assert metric.score(_Outputs([broken])) == pytest.approx(expected)


def test_analyze_calibrates_a_fixed_batch_model_at_the_batch_size_asked_for(tmp_path, monkeypatch):
    from lowbit.onnx import stages
    from lowbit.onnx.analyze import analyze

    seen = []

    def recording(float_model, batches, settings, **kwargs):
        seen.append((next(iter(batches))["x"].shape[0], kwargs["run_model"] is not None))
        return calibrate_model(float_model, batches, settings, **kwargs)

    calibrate_model = stages.calibrate_model
    monkeypatch.setattr(stages, "calibrate_model", recording)
    model = models.convnet()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    path = models.save(model, tmp_path / "b1.onnx")
    calib = models.calib_data(tmp_path / "c.npz", (3, 16, 16), n=24)
    result = analyze(path, calib, "int8", options=Options(progress=False), report=Reporting(samples=4, profile=False))
    assert seen == [(8, True)]  # batches of 8 through the freed copy, not of 1
    assert result.layers and all(np.isfinite(r.own_model.sqnr_db) for r in result.layers)
