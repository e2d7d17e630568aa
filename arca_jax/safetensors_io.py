"""Minimal safetensors reader/writer on numpy (bfloat16 through ml_dtypes), without torch.

The reader memory-maps the file and hands out one tensor at a time, so loading never holds two
full copies of a checkpoint. Every malformed input raises `CheckpointError` naming the file (and
the tensor, where there is one).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Any, Callable, Iterable, Mapping, Tuple

import ml_dtypes
import numpy as np

from arca_jax.errors import ConfigError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ConfigError):
    """A checkpoint or adapter file that cannot be read as asked."""


class SafetensorsFile:
    """Lazily readable safetensors file. Use as a context manager; `get(name)` returns a numpy view."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file not found")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: truncated or corrupt safetensors header "
                                      f"(header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries = header
        data_len = size - self._start
        for name, e in header.items():
            if not isinstance(e, dict) or e.get("dtype") not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has an unsupported entry {e!r}")
            begin, end = e["data_offsets"]
            expected = int(np.prod(e["shape"], dtype=np.int64)) * _DTYPES[e["dtype"]].itemsize
            if end - begin != expected:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes, its "
                                      f"shape {e['shape']} and dtype {e['dtype']} need {expected}")
            if end > data_len:
                raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} ends at byte "
                                      f"{self._start + end} but the file has {size} bytes")
        self._file = open(self.path, "rb")
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a new numpy array (one tensor is copied out of the mapped file)."""
        e = self._entries[name]
        begin, _ = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        count = int(np.prod(e["shape"], dtype=np.int64))
        view = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self._start + begin)
        out = view.reshape(e["shape"]).copy()
        del view
        return out

    def close(self):
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Lazy:
    """A tensor produced only when written: `shape`, `dtype` and a zero-argument `fn`."""

    def __init__(self, fn: Callable[[], Any], shape, dtype):
        self.fn, self.shape, self.dtype = fn, tuple(shape), np.dtype(dtype)

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.fn())
        return a if dtype is None else a.astype(dtype)


def save_file(path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None):
    """Writes `tensors` (name -> array or `Lazy`) one at a time, to a temporary file renamed at the end.

    Only one tensor is materialised on the host at any moment.
    """
    header = {}
    offset = 0
    for name, value in tensors.items():
        dtype = np.dtype(value.dtype)
        if dtype not in _NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = int(np.prod(value.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, value in tensors.items():
                a = np.ascontiguousarray(np.asarray(value))
                if a.shape != tuple(header[name]["shape"]) or _NAMES.get(a.dtype) != header[name]["dtype"]:
                    raise CheckpointError(f"{path}: tensor {name!r} produced {a.dtype}{a.shape}, "
                                          f"announced {header[name]['dtype']}{header[name]['shape']}")
                f.write(a.tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
