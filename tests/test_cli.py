import json

import numpy as np
import pytest

import lowbit
from lowbit.cli import main
from lowbit.trt_cache import read_trt_cache


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lowbit {lowbit.__version__}"
    assert main([]) == 0
    assert "calibrate" in capsys.readouterr().out


def test_demo_compares_every_method_and_writes_a_cache(tmp_path, capsys):
    cache, ranges = tmp_path / "demo.cache", tmp_path / "ranges.json"
    assert main(["calibrate", "--demo", "-m", "all", "-q", "--trt-cache", str(cache), "--json", str(ranges)]) == 0
    out = capsys.readouterr().out
    for method in ("minmax", "ema", "percentile", "entropy", "mse", "admm"):
        assert method in out
    results = json.loads(ranges.read_text())["results"]
    assert len(results) == 18  # 3 demo tensors x 6 methods
    entropy = {r["tensor"]: r for r in results if r["method"] == "entropy"}
    amax = read_trt_cache(cache).amax()
    assert amax.keys() == entropy.keys()
    for tensor, r in entropy.items():
        assert amax[tensor] == pytest.approx(r["hi"], rel=1e-6)
        assert r["lo"] == -r["hi"]
    by_method = {(r["tensor"], r["method"]): r["sqnr_db"] for r in results}
    # MSE minimises exactly the error SQNR measures: it is never worse than minmax.
    for tensor in entropy:
        assert by_method[(tensor, "mse")] >= by_method[(tensor, "minmax")] - 0.05


def test_calibrates_an_npz_and_saves_mergeable_statistics(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "acts.npz"
    np.savez(data, relu1=np.maximum(rng.standard_normal((100, 8)), 0), logits=rng.standard_normal((100, 10)) * 5)
    stats = tmp_path / "stats.npz"
    code = main(["calibrate", str(data), "-m", "percentile,minmax", "--option", "percentile.percentile=99.9",
                 "--asymmetric", "--batch-size", "16", "-q", "--save-stats", str(stats)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "uint8 asymmetric" in out and "relu1" in out and "logits" in out
    loaded = lowbit.calib.load(stats)
    assert set(loaded) == {"relu1", "logits"}
    assert loaded["logits"].percentile == 99.9 and loaded["logits"].num_batches == 7


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate"], "give either a DATA file or --demo"),
        (["calibrate", "--demo", "-m", "kl"], "unknown method 'kl'; known methods: admm, ema, entropy"),
        (["calibrate", "--demo", "--option", "bins=3"], "no selected method has an option 'bins'"),
        (["calibrate", "--demo", "--option", "nonsense"], "--option takes KEY=VALUE"),
        (["calibrate", "missing.npz"], "missing.npz does not exist"),
        (["calibrate", "--demo", "--bits", "0"], "bits must be an integer from 1 to 16"),
    ],
)
def test_bad_command_lines_are_clear_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_never_overwrites_the_input_and_reports_nan(tmp_path, capsys):
    data = tmp_path / "x.npy"
    np.save(data, np.array([1.0, np.nan, 2.0]))
    before = data.read_bytes()
    assert main(["calibrate", str(data), "-q", "--json", str(data)]) == 2
    assert "is the same file as DATA" in capsys.readouterr().err
    assert data.read_bytes() == before
    assert main(["calibrate", str(data), "-q"]) == 2
    err = capsys.readouterr().err
    assert "entropy calibrator for tensor 'x': batch 0 (counting from 0) contains 1 NaN and 0 Inf" in err
    assert "--skip-nonfinite" in err
    assert main(["calibrate", str(data), "-q", "--skip-nonfinite"]) == 0
    notnpy = tmp_path / "bad.npy"
    notnpy.write_text("hello")
    assert main(["calibrate", str(notnpy), "-q"]) == 2
    assert "is not a readable .npy file" in capsys.readouterr().err
