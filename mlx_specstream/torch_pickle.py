"""Read PyTorch ``.bin``/``.pt`` state dicts *without executing pickled code* and without torch.

A checkpoint is a zip holding ``data.pkl`` and raw storages. The pickle is replayed by an
unpickler that resolves only the handful of globals a state dict needs (tensor rebuilds, storage
types, ``OrderedDict``) — to our own functions that build numpy arrays. Any other global
(``os.system``, ``builtins.eval``, a model class...) is refused, and nothing is executed.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Dict

import mlx.core as mx
import numpy as np
from .errors import UserError


class UnsafeCheckpointError(UserError):
    """The file asks for something a plain tensor state dict never needs."""


# storage type -> numpy dtype (bfloat16 is carried as uint16 bits and reinterpreted later)
_STORAGES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
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


MAX_DIMS = 8  # no model tensor has more; also bounds what a crafted size can make us build


class _Storage:
    """A storage as read from the archive: flat bytes of one element type. Only these back a view
    (a rebuilt tensor passed as another's storage is refused: its rows are not its elements)."""

    def __init__(self, data: np.ndarray, is_bf16: bool):
        self.data, self.is_bf16 = data, is_bf16


class _Budget:
    """Bytes the tensors of one archive may make: views may overlap (tied weights share a
    storage) but never amount to much more than the archive holds."""

    def __init__(self, archive_bytes: int):
        self.left = 4 * archive_bytes + (64 << 20)

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise UnsafeCheckpointError(
                f"{what} would make {nbytes} bytes of tensors, more than the archive's "
                "storages can hold: overlapping views (zero strides or one storage "
                "repeated) of a crafted file"
            )
        self.left -= nbytes


def _ints(x, what: str):
    if (
        not isinstance(x, (tuple, list))
        or len(x) > MAX_DIMS
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 48 for v in x)
    ):
        # never repr() it: a crafted value may be nested thousands deep
        raise UnsafeCheckpointError(
            f"tensor {what} is not a valid view: expected a tuple of at most {MAX_DIMS} small non-negative integers"
        )
    return tuple(x)


def _rebuild_tensor(storage, offset, size, stride, *_, budget: _Budget = None, **__):
    """A tensor viewing ``storage``: its first and last bytes are checked to lie inside the
    storage's bytes before any view is made (a crafted file must not read memory it does not own)."""
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError("tensor storage is not a storage of the archive (a view of a view?)")
    data = storage.data
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < 1 << 48:
        raise UnsafeCheckpointError(f"tensor size {size} / stride {stride} / offset are not a valid view")
    n = math.prod(size)
    item = data.itemsize
    if budget is not None:
        budget.take(n * item, f"a tensor of size {size}")
    if n == 0:
        arr = np.zeros(size, data.dtype)
    else:
        end = (offset + sum((d - 1) * st for d, st in zip(size, stride)) + 1) * item  # bytes, exact ints
        if end > data.nbytes:
            raise UnsafeCheckpointError(
                f"tensor of size {size}, stride {stride}, offset {offset} reads byte "
                f"{end} of a storage of {data.nbytes} bytes: outside its storage"
            )
        arr = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=tuple(st * item for st in stride)
        ).copy()
    return BF16(arr) if storage.is_bf16 else arr


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, where: str, budget: _Budget):
        super().__init__(file)
        self.zf, self.prefix, self.where, self.budget = zf, prefix, where, budget

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            fn = _ALLOWED[(module, name)]
            return partial(fn, budget=self.budget) if fn is _rebuild_tensor else fn
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"{self.where}: refusing to load global {module}.{name} — a tensor state dict never needs it "
            "(the file may be malicious); nothing was executed"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self.where}: unexpected persistent id {pid!r}")
        st, key = pid[1], str(pid[2])
        if not key.isalnum():
            raise UnsafeCheckpointError(f"{self.where}: bad storage key {key!r}")
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise UnsafeCheckpointError(f"{self.where}: storage {key} is missing (truncated file?)") from None
        check_member(info, self.where)
        raw = self.zf.read(name)
        dtype = np.dtype(np.uint16 if st.dtype == "bfloat16" else st.dtype)
        if len(raw) % dtype.itemsize:
            raise UnsafeCheckpointError(
                f"{self.where}: storage {key} ({len(raw)} bytes) is not a whole number of {st.name} elements"
            )
        self.budget.take(len(raw), f"storage {key}")
        return _Storage(np.frombuffer(raw, dtype), st.dtype == "bfloat16")


def check_member(info: zipfile.ZipInfo, where: str) -> None:
    """Refuse a zip member that inflates far beyond its stored size (torch stores, never
    compresses): its declared size is checked before anything is read."""
    if info.file_size > max(16 * info.compress_size, 1 << 20):
        raise UnsafeCheckpointError(
            f"{where}: {info.filename} inflates {info.compress_size} bytes to {info.file_size}: not a torch checkpoint"
        )


def load_torch_file(path: Path) -> Dict[str, object]:
    """``{name: numpy array | BF16}`` from a torch zip checkpoint, refusing anything else."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(
            f"{path}: not a torch zip checkpoint (legacy or raw pickles are refused: they can run code)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkls) != 1:
                raise UnsafeCheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pkls)}")
            prefix = pkls[0][: -len("data.pkl")]
            check_member(zf.getinfo(pkls[0]), str(path))
            with zf.open(pkls[0]) as f:
                obj = _SafeUnpickler(f, zf, prefix, str(path), _Budget(path.stat().st_size)).load()
    except RecursionError:
        raise UnsafeCheckpointError(f"{path}: the pickle nests objects deeper than a state dict ever does") from None
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, TypeError, ValueError) as e:
        if isinstance(e, UnsafeCheckpointError):
            raise UnsafeCheckpointError(e if str(path) in str(e) else f"{path}: {e}") from None
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
