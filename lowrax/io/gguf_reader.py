"""A GGUF file's metadata and tensors, parsed once per process.

`gguf.GGUFReader` builds a NumPy view for every part of every metadata field: for SmolLM2's
49k-token vocabulary and 48k merges that takes about 2.4 s of each run's start on the 2-core CPU
(more under load). This parser reads the same layout (little-endian GGUF versions 2 and 3: header,
key-value metadata, tensor infos, aligned tensor data) with `struct` for the metadata and one
memory map for the data, in 0.24 s (`scripts/gguf_parse_time.py` times both); `tests/test_gguf_reader.py` compares every field and tensor with
`gguf.GGUFReader`'s. The result is shared by the weights' and the tokenizer's loaders, keyed by the
file's identity (path, size, modification time).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
# GGUF value types with a fixed width: type id -> (struct format, NumPy dtype)
FIXED = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
         4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
         10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
# Unquantized tensor types stored as plain arrays (ggml type id -> NumPy dtype); the rest are blocks of bytes.
PLAIN_TENSORS = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class GgufFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands; the message says where and why."""


@dataclasses.dataclass
class GgufField:
    """One metadata entry: its value as Python data (a scalar, a string or a list)."""

    name: str
    value: Any

    def contents(self) -> Any:  # `gguf.ReaderField`'s name for it
        return self.value


@dataclasses.dataclass
class GgufTensor:
    """One tensor: `shape` in GGUF's order (fastest axis first), `data` a read-only view of its bytes
    (a typed array for plain types, uint8 rows of blocks for quantized ones, as `gguf` gives them)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GgufFile:
    def __init__(self, path: str):
        self.path = path
        self._bytes = np.memmap(path, mode="r")
        self._pos = 0
        self.fields: dict[str, GgufField] = {}
        self.tensors: list[GgufTensor] = []
        self._parse()

    # the metadata, read with struct from the memory map's buffer
    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._bytes):
            raise GgufFormatError(f"the file ends inside its header at byte {self._pos} (truncated?)")
        value = struct.unpack_from(fmt, self._bytes, self._pos)[0]
        self._pos += size
        return value

    def _string(self) -> str:
        length = self._unpack("<Q")
        end = self._pos + length
        if end > len(self._bytes):
            raise GgufFormatError(f"a string at byte {self._pos} runs past the end of the file (truncated?)")
        text = bytes(self._bytes[self._pos:end]).decode("utf-8", errors="replace")
        self._pos = end
        return text

    def _value(self, value_type: int):
        if value_type == STRING:
            return self._string()
        if value_type == ARRAY:
            item_type, count = self._unpack("<I"), self._unpack("<Q")
            if item_type in FIXED:
                dtype = np.dtype(FIXED[item_type][1]).newbyteorder("<")
                end = self._pos + count * dtype.itemsize
                if end > len(self._bytes):
                    raise GgufFormatError(f"an array at byte {self._pos} runs past the end of the file (truncated?)")
                values = np.frombuffer(self._bytes, dtype, count, self._pos).tolist()
                self._pos = end
                return values
            return [self._value(item_type) for _ in range(count)]
        if value_type not in FIXED:
            raise GgufFormatError(f"unknown metadata value type {value_type} at byte {self._pos}")
        return self._unpack(FIXED[value_type][0])

    def _parse(self) -> None:
        import gguf

        if len(self._bytes) < 24 or bytes(self._bytes[:4]) != MAGIC:
            raise GgufFormatError("it does not start with the GGUF magic bytes")
        self._pos = 4
        version = self._unpack("<I")
        if version not in (2, 3):
            raise GgufFormatError(f"GGUF version {version} (a big-endian file reads as a huge number); "
                                  "this reader knows little-endian versions 2 and 3")
        tensor_count, field_count = self._unpack("<Q"), self._unpack("<Q")
        # the header as fields too, named as `gguf.GGUFReader` names them
        for name, value in (("GGUF.version", version), ("GGUF.tensor_count", tensor_count), ("GGUF.kv_count", field_count)):
            self.fields[name] = GgufField(name, value)
        for _ in range(field_count):
            name = self._string()
            self.fields[name] = GgufField(name, self._value(self._unpack("<I")))
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            infos.append((name, dims, self._unpack("<I"), self._unpack("<Q")))
        alignment = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else DEFAULT_ALIGNMENT
        start = -(-self._pos // alignment) * alignment
        seen = set()
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise GgufFormatError(f"tensor {name!r} appears twice")
            seen.add(name)
            self.tensors.append(self._tensor(gguf, name, dims, raw_type, start + offset))

    def _tensor(self, gguf, name: str, dims: list[int], raw_type: int, data_offset: int) -> GgufTensor:
        try:
            ggml_type = gguf.GGMLQuantizationType(raw_type)
            block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise GgufFormatError(f"tensor {name!r} has an unknown ggml type {raw_type}") from None
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        n_bytes = n_elements * type_size // block_size
        if data_offset + n_bytes > len(self._bytes):
            raise GgufFormatError(f"tensor {name!r} runs past the end of the file (truncated?)")
        numpy_shape = tuple(reversed(dims))
        if raw_type in PLAIN_TENSORS:
            data = np.frombuffer(self._bytes, PLAIN_TENSORS[raw_type], n_elements, data_offset)
        else:  # rows of quantized blocks, as bytes
            data = np.frombuffer(self._bytes, np.uint8, n_bytes, data_offset)
            numpy_shape = gguf.quant_shape_to_byte_shape(numpy_shape, ggml_type)
        return GgufTensor(name, ggml_type, np.array(dims, np.uint64), n_elements, n_bytes, data_offset,
                          data.reshape(numpy_shape))


def open_gguf(path: str | Path) -> GgufFile:
    """The (shared) parse of this GGUF file; GgufFormatError when it is not one."""
    stat = os.stat(path)
    return _parsed(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, size: int, mtime_ns: int) -> GgufFile:
    return GgufFile(path)
