"""Feeds for a model: arrays, folders, images and Python functions, cut into batches and checked."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lowbit.data import DataError, ImageOptions, InputSpec, check_feed, open_feeds

IMAGE = (InputSpec("x", np.dtype("float32"), (None, 3, 8, 8)),)


def test_batches_are_recut_across_chunks_and_sliced():
    chunks = [{"x": np.full((n, 3, 8, 8), i, np.float32)} for i, n in enumerate([3, 5, 2])]
    source = open_feeds(chunks, IMAGE)
    sizes = [b["x"].shape[0] for b in source.batches(4)]
    assert sizes == [4, 4, 2]
    batches = list(source.batches(4, start=2, stop=7))
    assert [b["x"].shape[0] for b in batches] == [4, 1]
    assert batches[0]["x"][:, 0, 0, 0].tolist() == [0, 1, 1, 1]  # samples 2..5: the last of chunk 0, then chunk 1


def test_npz_folder_of_chunks_and_sample_count(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"part{i}.npz", x=np.full((4, 3, 8, 8), i, np.float32))
    source = open_feeds(folder, IMAGE)
    assert source.num_samples == 12
    assert len(source.batches(5)) == 3
    assert sum(b["x"].shape[0] for b in source.batches(5)) == 12


def test_one_array_feeds_a_one_input_model_whatever_its_name(tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((6, 3, 8, 8), np.float32))
    source = open_feeds(tmp_path / "images.npy", IMAGE)
    assert next(iter(source.batches(4)))["x"].shape == (4, 3, 8, 8)


def test_mismatches_say_what_the_model_expects():
    two = (IMAGE[0], InputSpec("mask", np.dtype("int64"), (None, 8)))
    with pytest.raises(DataError, match=r"missing: mask.*|model's inputs are x: float32\[\?, 3, 8, 8\]; mask: int64"):
        check_feed({"x": np.zeros((1, 3, 8, 8), np.float32)}, two, "data")
    with pytest.raises(DataError, match="axis 2 differs"):
        check_feed({"x": np.zeros((1, 3, 9, 8), np.float32)}, IMAGE, "data")
    with pytest.raises(DataError, match="different numbers of samples"):
        check_feed({"x": np.zeros((2, 3, 8, 8), np.float32), "mask": np.zeros((3, 8), np.int64)}, two, "data")


def test_module_function_source(tmp_path, monkeypatch):
    (tmp_path / "my_calib_data.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    for i in range(3):\n"
        "        yield {'x': np.full((2, 3, 8, 8), i, np.float32)}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    source = open_feeds("my_calib_data:batches", IMAGE)
    assert source.num_samples is None
    assert [b["x"][0, 0, 0, 0] for b in source.batches(2, stop=5)] == [0, 1, 2]
    with pytest.raises(DataError, match="has no function 'nope'"):
        open_feeds("my_calib_data:nope", IMAGE)
    sys.modules.pop("my_calib_data", None)


def test_image_folder_preprocessing(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    (tmp_path / "cats").mkdir()
    pil.new("RGB", (20, 10), (255, 0, 51)).save(tmp_path / "cats" / "a.png")
    pil.new("RGB", (8, 16), (0, 255, 0)).save(tmp_path / "b.jpg", quality=100)
    options = ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), bgr=True)
    source = open_feeds(tmp_path, IMAGE, image_options=options)
    assert source.num_samples == 2
    (batch,) = list(source.batches(8))
    x = batch["x"]
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    red = x[1]  # sorted paths: b.jpg, then cats/a.png
    np.testing.assert_allclose(red[:, 4, 4], [(0.2 - 0.5) / 0.5, -1.0, 1.0], atol=1e-6)  # BGR order
    nhwc = (InputSpec("x", np.dtype("float32"), (None, 8, 8, 3)),)
    assert next(iter(open_feeds(tmp_path, nhwc).batches(1)))["x"].shape == (1, 8, 8, 3)
