"""Weight files read without their frameworks: PyTorch's state dicts (zip and legacy formats) and safetensors."""

from __future__ import annotations

import collections
import json
import os
import pickle
import zipfile

import numpy as np

from lowbit.errors import FormatError

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


_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "U8": "u1", "I8": "i1"}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (8-byte little-endian header size, JSON header, raw data)."""

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
