"""The GGUF container: header, metadata, tensor table, and the tensor bytes, memory-mapped.

Why not `gguf.GGUFReader`: it wraps every metadata value in NumPy memmap views, so the 98k
strings of a tokenizer (vocabulary + merges) take ~3 s to parse, once per open. This reads the
same format (spec: ggml/docs/gguf.md) with `struct` for the metadata (~0.1 s for that file) and
leaves the tensor data where it is: each tensor is a read-only uint8 view into one `mmap`.

`GGUFFile.get_field(key)` answers like `GGUFReader.get_field` (`.types`, `.contents()`), so code
that reads metadata (`jaxchunk.weights.gguf.gguf_field`, the tokenizer) takes either.

Layout (little-endian; version 2 and 3 use 64-bit counts and lengths):

    magic b"GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x (string key, u32 value type, value)           string = u64 length + UTF-8 bytes
    tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32), then the tensor data (offsets relative to it)
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

PathLike = Union[str, os.PathLike]

DEFAULT_ALIGNMENT = 32
# struct format of each scalar value type.
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
# NumPy dtype of each numeric value type (arrays of numbers are read in one go).
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


_U64 = struct.Struct("<Q")


class RawTensor(NamedTuple):
    """One tensor as stored: still quantized, a read-only view into the memory-mapped file.

    Blocks run along rows, so whole rows can be reordered without dequantizing: Q/K rows are
    in llama.cpp's permuted order here, and `unpermute_qk(blocks, n_head)` fixes that.
    """

    name: str
    qtype: str                 # GGML type name: "Q4_1", "Q8_0", "F32", ...
    shape: tuple[int, ...]     # logical shape in NumPy order: [out, in] for a linear weight
    blocks: np.ndarray         # uint8 [*shape[:-1], bytes per row]


@dataclasses.dataclass(frozen=True)
class GGUFField:
    """One metadata value. `types`: [the value type] or [ARRAY, item type(, ...)], as
    `gguf.ReaderField.types`; `value`: the decoded Python value (list for arrays)."""

    types: tuple[GGUFValueType, ...]
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file. `tensors` keep the file open (their bytes are views into its mmap)."""

    path: Path
    version: int
    fields: dict[str, GGUFField]       # metadata key -> value, in file order
    tensors: dict[str, RawTensor]      # tensor name -> its stored bytes, in file order
    data_offset: int                   # where the tensor data starts in the file
    mapping: Any = dataclasses.field(default=None, repr=False, compare=False)  # the mmap (b"" if empty)

    def get_field(self, key: str) -> Optional[GGUFField]:
        """The metadata value `key`, or None (as `GGUFReader.get_field`)."""
        return self.fields.get(key)

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident set, once the weights are copied out.

        Every page of the map that was read stays resident while the file is open: after a load
        that is the whole file (253 MB for Gemma 3 270M) beside the packed weights, and the
        tokenizer built next from the same parse added its own ~0.25 GB on top (the load's peak
        RSS). The tensors stay readable: a later read faults its pages back in from the page cache.
        """
        if isinstance(self.mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            self.mapping.madvise(mmap.MADV_DONTNEED)


class _Cursor:
    """Reads GGUF values from a buffer, front to back."""

    def __init__(self, buffer: memoryview, offset: int = 0):
        self.buffer, self.offset = buffer, offset

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        end = self.offset + n
        if end > len(self.buffer):
            raise ValueError(f"a string of {n} bytes at offset {self.offset} runs past the end of the file")
        text = str(self.buffer[self.offset:end], "utf-8")
        self.offset = end
        return text

    def strings(self, n: int) -> list[str]:
        """`n` strings in a row (a tokenizer's 49k tokens: one tight loop, no per-string calls)."""
        buffer, offset, size, out = self.buffer, self.offset, len(self.buffer), []
        unpack_length = _U64.unpack_from
        for _ in range(n):
            (length,) = unpack_length(buffer, offset)
            offset += 8
            if offset + length > size:
                raise ValueError(f"a string of {length} bytes at offset {offset} runs past the end of the file")
            out.append(str(buffer[offset:offset + length], "utf-8"))
            offset += length
        self.offset = offset
        return out

    def value_type(self) -> GGUFValueType:
        return GGUFValueType(self.scalar("<I"))

    def value(self, vtype: GGUFValueType) -> tuple[tuple[GGUFValueType, ...], Any]:
        """(types, value) of one value of type `vtype`."""
        if vtype == GGUFValueType.STRING:
            return (vtype,), self.string()
        if vtype != GGUFValueType.ARRAY:
            return (vtype,), self.scalar(_SCALAR_FORMATS[vtype])
        item, n = self.value_type(), self.scalar("<Q")
        if item in _NUMPY_DTYPES:  # numbers: one read, then plain Python values
            dtype = np.dtype(_NUMPY_DTYPES[item])
            if self.offset + n * dtype.itemsize > len(self.buffer):
                raise ValueError(f"an array of {n} {item.name} at offset {self.offset} runs past the end")
            values = np.frombuffer(self.buffer, dtype, n, self.offset).tolist()
            self.offset += n * dtype.itemsize
            return (vtype, item), values
        if item == GGUFValueType.STRING:
            return (vtype, item), self.strings(n)
        parts = [self.value(item) for _ in range(n)]  # arrays of arrays
        item_types = parts[0][0] if parts else (item,)
        return (vtype, *item_types), [v for _, v in parts]


def read_gguf(path: PathLike) -> GGUFFile:
    """Parse the GGUF at `path` (little-endian, version 2 or 3; `jaxchunk.weights.gguf.open_gguf`
    checks those first and turns the ValueError / struct.error this raises on a corrupt or
    truncated file into a ModelFileError)."""
    path = Path(path)
    with open(path, "rb") as f:
        # An empty file cannot be mapped; it fails below as truncated instead.
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    data = np.frombuffer(mapped, np.uint8)  # keeps the map alive for as long as a view exists
    cursor = _Cursor(memoryview(mapped))
    if cursor.scalar("<4s") != b"GGUF":
        raise ValueError("GGUF magic invalid")
    version, tensor_count, kv_count = cursor.scalar("<I"), cursor.scalar("<Q"), cursor.scalar("<Q")

    fields: dict[str, GGUFField] = {}
    for _ in range(kv_count):
        key = cursor.string()
        if key in fields:
            raise ValueError(f"duplicate metadata key {key!r}")
        types, value = cursor.value(cursor.value_type())
        fields[key] = GGUFField(types, value)

    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.scalar("<I")
        dims = [cursor.scalar("<Q") for _ in range(n_dims)]
        # A NumPy scalar, as GGUFReader passes it: an unknown id reads "np.uint32(99) is not a valid ..."
        qtype = GGMLQuantizationType(np.uint32(cursor.scalar("<I")))
        infos.append((name, dims, qtype, cursor.scalar("<Q")))

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        align = fields["general.alignment"]
        if align.types != (GGUFValueType.UINT32,) or align.value <= 0 or align.value & (align.value - 1):
            raise ValueError(f"general.alignment must be a power of two (uint32), got {align.value!r}")
        alignment = align.value
    data_offset = -(-cursor.offset // alignment) * alignment

    tensors: dict[str, RawTensor] = {}
    for name, dims, qtype, offset in infos:
        if name in tensors:
            raise ValueError(f"duplicate tensor {name!r}")
        shape = tuple(int(d) for d in reversed(dims))  # GGUF lists ne[0] (columns) first
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block_size * type_size
        start = data_offset + offset
        if start + n_bytes > len(data):
            raise ValueError(f"tensor {name!r} ({n_bytes} bytes at {start}) runs past the end of the "
                             f"file ({len(data)} bytes)")
        blocks = data[start:start + n_bytes].reshape(*shape[:-1], -1)
        tensors[name] = RawTensor(name, qtype.name, shape, blocks)
    return GGUFFile(path, version, fields, tensors, data_offset, mapped)
