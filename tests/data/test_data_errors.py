"""Bad data is refused where it enters, with one line that names the data, the input and what to do (issue 23)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.cli import main
from lowbit.data import DataError, ImageOptions, InputSpec, open_feeds, tensor_batches
from lowbit.errors import DataWarning
from lowbit.onnx import Options
from lowbit.onnx.pipeline import quantize
from tests.onnx import models

X = (InputSpec("x", np.dtype("float32"), (None, 3, 16, 16)),)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def _samples(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


@pytest.fixture
def model(tmp_path):
    return models.save(models.convnet(), tmp_path / "m.onnx")


# -- 1. non-finite input data ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "counts"), [(np.nan, "2 NaN and 0 Inf"), (np.inf, "0 NaN and 2 Inf")])
def test_nonfinite_samples_name_the_file_input_and_first_sample_from_0(tmp_path, value, counts):
    x = _samples()
    x[37, 1, 2, 3] = x[5, 0, 0, 0] = value
    np.savez(tmp_path / "bad.npz", x=x)
    source = open_feeds(tmp_path / "bad.npz", X)
    with pytest.raises(DataError) as info:
        list(source.batches(8))
    message = _one_line(info)
    assert "bad.npz" in message and "input 'x'" in message
    assert "first in sample 5 (counting from 0)" in message and counts in message
    assert "fix or drop" in message
    # Samples count from the start of the data, across the chunks it is read in.
    chunks = [{"x": _samples(8)}, {"x": x[:8]}]
    with pytest.raises(DataError, match=r"first in sample 13 \(counting from 0\); samples 8-15 hold"):
        list(open_feeds(chunks, X).batches(4, start=12))


def test_nonfinite_arrays_passed_in_python_are_refused_when_opened():
    x = _samples(4)
    x[2, 0, 0, 0] = -np.inf
    with pytest.raises(DataError, match=r"evaluation data: input 'x' .* sample 2 .* 0 NaN and 1 Inf"):
        open_feeds({"x": x}, X, role="evaluation data")


def test_integer_inputs_are_not_checked_for_nan():
    tokens = (InputSpec("ids", np.dtype("int64"), (None, 4)),)
    assert len(list(open_feeds({"ids": np.zeros((3, 4), np.int64)}, tokens).batches(2))) == 2


def test_quantize_refuses_nan_in_the_evaluation_data(tmp_path, model):
    np.savez(tmp_path / "calib.npz", x=_samples())
    bad = _samples(16, seed=1)
    bad[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "eval.npz", x=bad)
    with pytest.raises(DataError, match=r"eval.npz: input 'x' .*sample 3 \(counting from 0\).* 1 NaN and 0 Inf"):
        quantize(
            model,
            tmp_path / "q.onnx",
            tmp_path / "calib.npz",
            "int8",
            eval_data=tmp_path / "eval.npz",
            options=Options(progress=False),
        )


def test_cli_quantize_refuses_nan_in_eval_data_instead_of_printing_cosine_nan(tmp_path, model, capsys):
    np.savez(tmp_path / "calib.npz", x=_samples())
    bad = _samples(16, seed=1)
    bad[3] = np.nan
    np.savez(tmp_path / "eval.npz", x=bad)
    argv = ["quantize", model, "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz")]
    assert main([*argv, "-o", str(tmp_path / "q.onnx"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "eval.npz: input 'x'" in err and "sample 3 (counting from 0)" in err and "cosine nan" not in err


# -- 2. a tensor inside the model becomes NaN from finite inputs ------------------------------------------------------


def _sqrt_conv(path) -> str:
    """x -> Sqrt -> Conv: negative inputs make the Conv's input NaN inside the model."""
    w = numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["root"], "sqrt"), helper.make_node("Conv", ["root", "w"], ["y"], "conv")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 14, 14])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def test_cli_option_skip_nonfinite_reaches_the_calibrators(tmp_path, capsys):
    model = _sqrt_conv(tmp_path / "sqrt.onnx")
    x = np.abs(_samples())
    x[:, 0, 0, 0] = -1.0  # finite input, NaN after Sqrt
    np.savez(tmp_path / "calib.npz", x=x)
    argv = ["quantize", model, "--calib", str(tmp_path / "calib.npz"), "--no-compare", "-q"]
    assert main([*argv, "-o", str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err
    assert "tensor 'root': batch 0 (counting from 0) contains" in err
    assert "--option skip_nonfinite=true" in err
    assert main([*argv, "-o", str(tmp_path / "b.onnx"), "--option", "skip_nonfinite=true"]) == 0


# -- 3. arrays of the wrong kind ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "holds"),
    [
        (np.array(["a", "b"]), "strings"),
        (np.array([None, 1], dtype=object), "Python objects"),
        (np.zeros((2, 3, 16, 16), np.complex64), "complex numbers"),
        (np.zeros(2, bool), "booleans"),
    ],
)
def test_a_non_numeric_array_is_a_dtype_error_before_any_rank_error(array, holds):
    with pytest.raises(DataError) as info:
        list(open_feeds({"x": array}, X).batches(8))
    message = _one_line(info)
    assert f"input 'x' holds {holds}" in message and "expects float32" in message and "rank" not in message


def test_a_string_npz_is_a_dtype_error(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.array(["a"] * 5))
    with pytest.raises(DataError, match=r"s.npz: input 'x' holds strings \(dtype <U1\) but the model expects float32"):
        list(open_feeds(tmp_path / "s.npz", X).batches(8))


# -- 4. a folder with nothing to read -------------------------------------------------------------------------------


def test_a_folder_without_images_or_arrays_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("no data here")
    with pytest.raises(DataError) as info:
        open_feeds(tmp_path, X)
    message = _one_line(info)
    assert "holds no images (.jpg, .jpeg, .png, ...) and no .npy/.npz files" in message


# -- 5. image options -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"size": 0}, "--image-size, ImageOptions.size"),
        ({"size": (224, -1)}, "--image-size, ImageOptions.size"),
        ({"resize": 0}, "--resize, ImageOptions.resize"),
        ({"mean": ()}, "--mean, ImageOptions.mean"),
        ({"std": (1.0, 0.0, 1.0)}, "--std, ImageOptions.std"),
        ({"scale": 0.0}, "--scale, ImageOptions.scale"),
        ({"layout": "chw"}, "--layout, ImageOptions.layout"),
    ],
)
def test_image_options_are_checked_when_built_and_name_the_option(options, names):
    with pytest.raises(DataError) as info:
        ImageOptions(**options)
    assert names in _one_line(info)


@pytest.fixture
def images(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pil.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_mean_and_std_take_one_value_or_one_per_channel(images):
    with pytest.raises(DataError) as info:
        open_feeds(images, X, image_options=ImageOptions(mean=(0.5, 0.5)))
    message = _one_line(info)
    assert "--mean (ImageOptions.mean) has 2 values" in message and "has 3 channels: give 1 value or 3" in message
    with pytest.raises(DataError, match=r"--std \(ImageOptions.std\) has 2 values"):
        open_feeds(images, X, image_options=ImageOptions(std=(0.5, 0.5)))
    source = open_feeds(images, X, image_options=ImageOptions(mean=(0.5, 0.4, 0.3), std=(0.2,)))
    assert next(iter(source.batches(8)))["x"].shape == (3, 3, 16, 16)


# -- 6. one array for a one-input model -----------------------------------------------------------------------------


def test_a_4d_array_feeds_a_rank_4_input():
    source = open_feeds(_samples(10), X)
    assert source.num_samples == 10
    assert [b["x"].shape for b in source.batches(8)] == [(8, 3, 16, 16), (2, 3, 16, 16)]


def test_an_array_of_the_wrong_rank_states_both_ranks():
    with pytest.raises(DataError, match=r"shape \(10, 3, 16\) \(rank 3\) but the model expects rank 4"):
        open_feeds(_samples(10)[:, :, :, 0], X)


def test_quantize_takes_a_4d_array_as_calib(tmp_path, model):
    result = quantize(model, tmp_path / "q.onnx", _samples(), "int8", options=Options(compare=False, progress=False))
    assert result.calibration_samples > 0


# -- 7. a named array for an input of another name ------------------------------------------------------------------


def test_an_array_of_another_name_is_used_with_one_warning(tmp_path):
    np.savez(tmp_path / "data.npz", images=_samples(20))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = open_feeds(tmp_path / "data.npz", X)
        assert sum(b["x"].shape[0] for b in source.batches(8)) == 20
        assert sum(b["x"].shape[0] for b in source.batches(8)) == 20
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert messages == [f"{tmp_path / 'data.npz'}: using the array 'images' for the model's only input 'x'; "
                        "name the array 'x' to silence this"]  # fmt: skip


def test_a_lone_npy_file_or_an_unnamed_array_gives_no_warning(tmp_path):
    np.save(tmp_path / "images.npy", _samples(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        next(iter(open_feeds(tmp_path / "images.npy", X).batches(4)))
        next(iter(open_feeds(_samples(4), X).batches(4)))


# -- 8. "must be positive" names the option -------------------------------------------------------------------------


def test_batch_size_message_names_the_option(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(4, np.float32))
    with pytest.raises(DataError, match=r"batch_size \(--batch-size\) must be a positive integer, got 0"):
        tensor_batches(tmp_path / "x.npy", 0)
