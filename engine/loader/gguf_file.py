"""A GGUF file's metadata and tensor table, read over one memory map.

gguf's ``GGUFReader`` builds numpy views for every part of every metadata value. For the default
model's tokenizer (about 98k strings) that was most of the model's load time: 15-16 s against
0.5-0.7 s for this reader on a 2-core machine running slow (docs/BENCHMARKS.md). This reads the
same format with ``struct`` and hands the tensors over as gguf's own ``ReaderTensor``, with the
data views ``GGUFReader`` gives (tests/test_gguf_file.py compares the two). gguf still supplies the
type tables and the dequantizers.
"""

from __future__ import annotations

import mmap
import struct

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, ReaderTensor
from gguf.quants import quant_shape_to_byte_shape

VERSIONS = (2, 3)
# GGUFValueType -> struct format of the scalar types
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
# the same, as numpy types, for arrays of them
ARRAYS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
STRING = 8
ARRAY = 9
# tensor types whose data is a plain numpy array (the others are bytes per block)
PLAIN = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
         GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
         GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
         GGMLQuantizationType.I64: np.int64}


class GGUFFile:
    """``metadata``: key -> value (numbers, strings and lists of them); ``tensors``: the tensor
    table in file order. Raises ValueError, struct.error or IndexError on a corrupt file."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self.map, dtype=np.uint8)  # read-only, as the tensors' views
        self.offset = 0
        if self._bytes(4) != b"GGUF":
            raise ValueError("bad magic")
        version = self._scalar(4)
        if version not in VERSIONS:
            raise ValueError(f"GGUF version {version} (a big-endian file, or not 2 or 3)")
        num_tensors = self._scalar(10)
        num_keys = self._scalar(10)
        self.metadata = {}
        for _ in range(num_keys):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        infos = [self._tensor_info() for _ in range(num_tensors)]
        alignment = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment {alignment} is not a power of two")
        start = -(-self.offset // alignment) * alignment
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _bytes(self, count: int) -> bytes:
        end = self.offset + count
        if end > len(self.map):
            raise ValueError(f"a field runs past the end of the file (at byte {self.offset})")
        out = self.map[self.offset:end]
        self.offset = end
        return out

    def _scalar(self, kind: int):
        fmt = SCALARS[kind]
        return struct.unpack(fmt, self._bytes(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return self._bytes(self._scalar(10)).decode("utf-8")

    def _value(self, kind: int):
        if kind == STRING:
            return self._string()
        if kind != ARRAY:
            return self._scalar(kind)
        item_kind = self._scalar(4)
        count = self._scalar(10)
        if item_kind in ARRAYS:
            dtype = np.dtype(ARRAYS[item_kind])
            return np.frombuffer(self._bytes(count * dtype.itemsize), dtype).tolist()
        return [self._value(item_kind) for _ in range(count)]

    def _tensor_info(self) -> tuple:
        name = self._string()
        num_dims = self._scalar(4)
        dims = [self._scalar(10) for _ in range(num_dims)]
        kind = GGMLQuantizationType(self._scalar(4))
        return name, dims, kind, self._scalar(10)

    def _tensor(self, start: int, name: str, dims: list[int], kind, offset: int) -> ReaderTensor:
        """The tensor ``name`` as GGUFReader gives it: dims in GGUF order (fastest first), data
        shaped the other way round, as bytes per row for block types."""
        num_elements = int(np.prod(dims))
        block_size, type_size = GGML_QUANT_SIZES[kind]
        num_bytes = num_elements * type_size // block_size
        begin = start + offset
        if begin + num_bytes > len(self.data):
            raise ValueError(f"tensor {name} runs past the end of the file")
        shape = tuple(reversed(dims))
        raw = self.data[begin:begin + num_bytes]
        if kind in PLAIN:
            data = raw.view(PLAIN[kind]).reshape(shape)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(shape, kind))
        return ReaderTensor(name=name, tensor_type=kind, shape=np.array(dims, dtype=np.uint64),
                            n_elements=num_elements, n_bytes=num_bytes, data_offset=begin,
                            data=data, field=None)
