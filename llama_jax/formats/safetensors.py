"""safetensors files read and written without torch: the header up front, tensors on demand."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """Reader of one `.safetensors` file: the header up front, each tensor read on demand.

    Tensors are read into fresh arrays (not memory-mapped), so a conversion holds only the
    tensors it is working on besides its output.
    """

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._offset = 8 + n

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        dtype = np.dtype(_ST_DTYPES[e["dtype"]])
        start, end = e["data_offsets"]
        count = (end - start) // dtype.itemsize
        a = np.fromfile(self.path, dtype=dtype, count=count, offset=self._offset + start)
        return a.reshape(e["shape"])


def write_safetensors(
    path: str, tensors: Iterator[tuple[str, np.ndarray]] | dict, metadata: dict | None = None
) -> None:
    """Writes tensors (name -> array, views welcome) to `path` atomically (temp, then rename).

    Each tensor is made contiguous only while it is written, one at a time.
    """
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, a in items:
        if a.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {
            "dtype": _ST_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section as the reference writer does
    tmp = path + ".tmp"  # streamed (tensors do not fit twice in memory), renamed when complete
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, a in items:
                np.ascontiguousarray(a).tofile(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
