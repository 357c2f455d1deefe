"""Read PyTorch ``.bin``/``.pt`` state dicts *without executing pickled code* and without torch.

A checkpoint is a zip holding ``data.pkl`` and raw storages. The pickle is replayed by an
unpickler that resolves only the handful of globals a state dict needs (tensor rebuilds, storage
types, ``OrderedDict``) — to our own functions that build numpy arrays. Any other global
(``os.system``, ``builtins.eval``, a model class...) is refused, and nothing is executed.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict

import mlx.core as mx
import numpy as np


class UnsafeCheckpointError(ValueError):
    """The file asks for something a plain tensor state dict never needs."""


# storage type -> numpy dtype (bfloat16 is carried as uint16 bits and reinterpreted later)
_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": "bfloat16",
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGES[name]


class BF16:
    """A bfloat16 tensor as its uint16 bit pattern."""

    def __init__(self, bits: np.ndarray):
        self.bits = bits

    @property
    def shape(self):
        return self.bits.shape


def _rebuild_tensor(storage, offset, size, stride, *_, **__):
    data, is_bf16 = storage
    itemsize = data.itemsize
    n = int(np.prod(size)) if len(size) else 1
    if n == 0:
        arr = np.zeros(size, data.dtype)
    else:
        arr = np.lib.stride_tricks.as_strided(
            data[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
        ).copy()
    return BF16(arr) if is_bf16 else arr


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, where: str):
        super().__init__(file)
        self.zf, self.prefix, self.where = zf, prefix, where

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"{self.where}: refusing to load global {module}.{name} — a tensor state dict never needs it "
            "(the file may be malicious); nothing was executed")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self.where}: unexpected persistent id {pid!r}")
        st, key = pid[1], str(pid[2])
        if not key.isalnum():
            raise UnsafeCheckpointError(f"{self.where}: bad storage key {key!r}")
        try:
            raw = self.zf.read(f"{self.prefix}data/{key}")
        except KeyError:
            raise UnsafeCheckpointError(f"{self.where}: storage {key} is missing (truncated file?)") from None
        if st.dtype == "bfloat16":
            return np.frombuffer(raw, np.uint16), True
        return np.frombuffer(raw, st.dtype), False


def load_torch_file(path: Path) -> Dict[str, object]:
    """``{name: numpy array | BF16}`` from a torch zip checkpoint, refusing anything else."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(
            f"{path}: not a torch zip checkpoint (legacy or raw pickles are refused: they can run code)")
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkls) != 1:
                raise UnsafeCheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pkls)}")
            prefix = pkls[0][: -len("data.pkl")]
            with zf.open(pkls[0]) as f:
                obj = _SafeUnpickler(f, zf, prefix, str(path)).load()
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as e:
        raise UnsafeCheckpointError(f"{path}: corrupt checkpoint ({e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise UnsafeCheckpointError(f"{path}: not a state dict of named tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, (np.ndarray, BF16))]
    if bad:
        raise UnsafeCheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    return dict(obj)


def to_mx(v):
    if isinstance(v, BF16):
        return mx.array(v.bits).view(mx.bfloat16)
    return mx.array(v)
