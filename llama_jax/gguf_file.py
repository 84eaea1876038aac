"""The GGUF container (versions 2 and 3): metadata and tensor directory, parsed fast.

`gguf.GGUFReader` builds a numpy view per metadata element, which takes ~15 s on a file whose
tokenizer holds 100k strings. This parser reads the same header with `struct` over a memory map
(well under a second) and leaves each tensor's bytes as a zero-copy numpy view, for
`gguf.quants.dequantize` to decode. Layout: magic "GGUF", u32 version, u64 tensor count, u64
key/value count, the key/values, the tensor infos (name, dims innermost first, GGML type,
offset), then the tensor data from the next `general.alignment` boundary (default 32).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from typing import Any

import numpy as np

MAGIC = b"GGUF"
_SCALARS = {  # GGUF value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: name, numpy shape (outermost first), GGML type, raw bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute, in the file
    n_bytes: int


class GGUFContainer:
    """A GGUF file's metadata (key -> Python value) and tensor directory, memory-mapped.

    Raises:
      ValueError: not a GGUF file, an unsupported version, or a truncated / corrupt header or
        tensor directory (one line naming the file).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        with open(self.path, "rb") as f:
            magic = f.read(4)
            if magic != MAGIC:
                raise ValueError(
                    f"{self.path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
                )
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = len(self._mm)
        try:
            self._parse()
        except (struct.error, ValueError, UnicodeDecodeError, IndexError) as e:
            raise ValueError(
                f"{self.path}: not a readable GGUF file (truncated or corrupt: {e})"
            ) from None

    def _read(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._read("<Q")
        if self._pos + n > self.size:
            raise ValueError(f"a string of {n} bytes at byte {self._pos} runs past the end")
        s = self._mm[self._pos : self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, n = self._read("<I"), self._read("<Q")
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                end = self._pos + n * dt.itemsize
                if end > self.size:
                    raise ValueError(f"an array of {n} items at byte {self._pos} runs past the end")
                a = np.frombuffer(self._mm, dt, n, self._pos).tolist()
                self._pos = end
                return a
            return [self._value(etype) for _ in range(n)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self._pos}")
        return self._read(_SCALARS[vtype])

    def _parse(self) -> None:
        import gguf  # deferred: the gguf package (block sizes of GGML types) is optional

        self._pos = 4
        self.version = self._read("<I")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version}; supported: 2, 3")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            infos.append((name, tuple(reversed(dims)), self._read("<I"), self._read("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(ggml_type)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name} has unknown GGML type {ggml_type}") from None
            n_bytes = int(np.prod(shape, dtype=np.int64)) * type_size // block
            begin = start + offset
            if begin + n_bytes > self.size:
                raise ValueError(
                    f"truncated: tensor {name} ends at byte {begin + n_bytes} but the file has "
                    f"{self.size} bytes"
                )
            self.tensors[name] = TensorInfo(name, shape, ggml_type, begin, n_bytes)

    def type_name(self, name: str) -> str:
        """The GGML type name ("Q4_K", "F32", ...) of tensor `name`."""
        import gguf

        return gguf.GGMLQuantizationType(self.tensors[name].ggml_type).name

    def raw(self, name: str) -> np.ndarray:
        """Tensor `name`'s bytes as a read-only uint8 view, shaped [rows, bytes per row]."""
        t = self.tensors[name]
        a = np.frombuffer(self._mm, np.uint8, t.n_bytes, t.offset)
        rows = int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1
        return a.reshape(rows, -1)

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in its numpy shape (F32 / F16 / BF16 values exactly)."""
        import gguf

        t = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(t.ggml_type)
        raw = self.raw(name)
        if qtype == gguf.GGMLQuantizationType.F32:
            out = raw.view(np.float32).copy()
        else:
            out = gguf.quants.dequantize(raw, qtype)
        return np.asarray(out, np.float32).reshape(t.shape)
