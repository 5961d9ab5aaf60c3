"""Weights in blocks of 32 inputs for the CPU block kernels (kernels/cpu/blocks.cpp).

``BlockLinear`` holds a projection as GGUF stores it: 4-bit codes with a scale and a minimum per
block (Q4_0, Q4_1, K-quants, our int4) or 8-bit codes with a scale per block (Q8_0, our int8).
The kernel rounds each activation row to 8 bits per block and takes integer dot products, as
llama.cpp does on this kind of CPU; the float32 path with dequantized weights stays the exact
reference (``--quantization none``). Rows are computed independently and in a fixed order, so a
row's output does not depend on the other rows of the call (the verify rows, other requests).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from mtpserve.kernels.cpu_build import library

BLOCK = 32


class QWeightStruct(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("min", ctypes.c_void_p), ("bits", ctypes.c_int32), ("n", ctypes.c_int32),
                ("k", ctypes.c_int32), ("tiled", ctypes.c_int32), ("half", ctypes.c_void_p)]


def available() -> bool:
    """Whether the block kernels built and load on this machine (cpu_build.py)."""
    return library() is not None


def fits(weight) -> bool:
    """Whether a QuantizedWeight has whole blocks of 32 inputs (its groups too)."""
    return weight.shape[1] % BLOCK == 0 and weight.group_size % BLOCK == 0


def per_block(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in / group_size]`` group values repeated for each block of 32 inputs."""
    return values.float().repeat_interleave(group_size // BLOCK, dim=1).contiguous()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` 4-bit codes as ``[out, in / 2]`` bytes, GGUF's order: byte j of a block holds
    value j (low nibble) and value j + 16 (high nibble)."""
    out_features, in_features = codes.shape
    blocks = codes.to(torch.uint8).view(out_features, in_features // BLOCK, 2, BLOCK // 2)
    packed = blocks[:, :, 0] | (blocks[:, :, 1] << 4)
    return packed.reshape(out_features, in_features // 2).contiguous()


def tile_width() -> int:
    """Outputs per tile of the tiled kernel (16 with AVX-512 VNNI, else 8); 0 without the kernels."""
    lib = library()
    if lib is None:
        return 0
    return lib.mtp_tile_width()


def tile_starts() -> bool:
    """Whether 8-bit tiles carry their blocks' start sums (the AVX-512 VNNI kernel's)."""
    return bool(library().mtp_tile_starts())


def block_bytes(bits: int) -> int:
    return BLOCK * bits // 8


def tile_codes(codes: torch.Tensor, bits: int, tile: int) -> torch.Tensor:
    """Codes ``[out, in * bits / 8]`` in tiles of ``tile`` outputs: per tile and block, groups of
    ``tile`` x 4 bytes (4 groups for 4 bits, 8 for 8 bits), byte 4 j + i of group g being byte
    4 g + i of output j's block (4 bits: its inputs 4 g + i and 16 + 4 g + i), so that a 32-bit lane
    of the kernel's vector is one output."""
    out_features, row_bytes = codes.shape
    size = block_bytes(bits)
    grid = codes.view(out_features // tile, tile, row_bytes // size, size // 4, 4)
    return grid.permute(0, 2, 3, 1, 4).contiguous().view(out_features, row_bytes)


def tile_blocks(values: torch.Tensor, tile: int) -> torch.Tensor:
    """Per-block values ``[out, blocks]`` in tiles of ``tile`` outputs: ``[out / tile, blocks, tile]``."""
    out_features, blocks = values.shape
    grid = values.view(out_features // tile, tile, blocks)
    return grid.permute(0, 2, 1).contiguous().view(out_features, blocks)


def tiled_code_rows(codes: torch.Tensor, bits: int, tile: int, index: torch.Tensor) -> torch.Tensor:
    """Outputs ``index`` of tiled codes, one row each as before ``tile_codes``."""
    out_features, row_bytes = codes.shape
    size = block_bytes(bits)
    grid = codes.view(out_features // tile, row_bytes // size, size // 4, tile, 4)
    return grid[index // tile, :, :, index % tile].reshape(len(index), row_bytes)


def tiled_block_rows(values: torch.Tensor, tile: int, index: torch.Tensor) -> torch.Tensor:
    """Outputs ``index`` of tiled per-block values, as before ``tile_blocks``."""
    out_features, blocks = values.shape
    grid = values.view(out_features // tile, blocks, tile)
    return grid[index // tile, :, index % tile]


def half_pairs(scales: torch.Tensor, seconds: torch.Tensor, tile: int) -> torch.Tensor | None:
    """Tiled per-block values (``tile_blocks``) in pairs ``[out / tile, blocks, 2, tile]`` of 16
    bits, a tile's block in one cache line: the scales in float16, then ``seconds``, the minimums
    in float16 (4 bits) or the code sums in int16 (8 bits); None where float16 does not hold them
    exactly (GGUF's Q4_0, Q4_1 and Q8_0 store them so). One line fewer to read from memory per
    block: the projections of a decode step run 10-20% faster (docs/BENCHMARKS.md)."""
    first = exact_half(scales)
    if seconds.is_floating_point():
        second = exact_half(seconds)
    else:
        second = seconds.to(torch.int16)
    if first is None or second is None:
        return None
    return torch.stack([first.view(-1, tile), second.view(-1, tile)], dim=1).contiguous()


def exact_half(values: torch.Tensor) -> torch.Tensor | None:
    """``values`` as float16 bits (int16), or None where float16 does not hold them exactly."""
    half = values.to(torch.float16)
    if not torch.equal(half.float(), values):
        return None
    return half.view(torch.int16)


class BlockLinear(nn.Module):
    """A projection ``[out, in]`` in blocks of 32 for the CPU block kernels. Its rows can be read
    one by one, so it also serves as a tied embedding and as a draft head over a vocabulary
    subset."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bits: int, tiled: bool = False):
        """One row of codes, scales and minimums (4 bits) per output. ``tiled``: kept in tiles for
        the tiled kernel (``tile_codes``) where the kernels load and the outputs fill whole tiles."""
        super().__init__()
        self.bits = bits
        self.out_features = scales.shape[0]
        self.in_features = scales.shape[1] * BLOCK
        self.tile = 0
        if tiled:
            width = tile_width()
            if width and self.out_features % width == 0:
                self.tile = width
        starts = None
        half = None
        if self.tile:
            scales = tile_blocks(scales, self.tile)
            if bits == 8 and tile_starts():  # its integer sums start at -128 times the code sum
                sums = tile_blocks(codes.view(self.out_features, -1, BLOCK).sum(-1, dtype=torch.int32),
                                   self.tile)
                half = half_pairs(scales, sums, self.tile)
                if half is None:  # else the pairs carry the sums
                    starts = -128 * sums
            if bits == 4:
                mins = tile_blocks(mins, self.tile)
                half = half_pairs(scales, mins, self.tile)
            codes = tile_codes(codes, bits, self.tile)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.register_buffer("starts", starts)
        self.register_buffer("half_scales", half)
        self._struct = None

    @classmethod
    def of(cls, weight, tiled: bool = False) -> BlockLinear:
        """The block form of a QuantizedWeight (groups of any multiple of 32)."""
        scales = per_block(weight.scales, weight.group_size)
        if weight.bits == 4:
            mins = per_block(weight.zeros, weight.group_size)
            return cls(pack_nibbles(weight.codes), scales, mins, 4, tiled)
        return cls(weight.codes.to(torch.int8).contiguous(), scales, None, 8, tiled)

    def struct(self) -> QWeightStruct:
        """The kernel's view of this weight (pointers into its buffers)."""
        if self._struct is None:
            mins = 0
            if self.mins is not None:
                mins = self.mins.data_ptr()
            if self.starts is not None:
                mins = self.starts.data_ptr()
            half = 0
            if self.half_scales is not None:
                half = self.half_scales.data_ptr()
            self._struct = QWeightStruct(self.codes.data_ptr(), self.scales.data_ptr(), mins,
                                         self.bits, self.out_features, self.in_features,
                                         int(self.tile > 0), half)
        return self._struct

    def _apply(self, fn, recurse=True):
        """Buffers stay as packed (integer codes, float32 scales); a move drops the pointers."""
        self._struct = None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        out = torch.empty(rows.shape[0], self.out_features)
        library().mtp_linear(ctypes.c_void_p(rows.data_ptr()), rows.shape[0],
                             ctypes.byref(self.struct()), ctypes.c_void_p(out.data_ptr()))
        out = out.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight."""
        return dequantize_blocks(*self._picked(torch.arange(self.out_features)), self.bits)

    def rows(self, index: torch.Tensor) -> BlockLinear:
        """The projection onto the outputs ``index`` only (tiled if this one is)."""
        codes, scales, mins = self._picked(index)
        return BlockLinear(codes.contiguous(), scales.contiguous(), mins, self.bits, self.tile > 0)

    def embedding(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``index`` dequantized: ``[*index.shape, in]``."""
        ids = index.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(len(ids), self.in_features)
        library().mtp_embed_rows(ctypes.byref(self.struct()), ctypes.c_void_p(ids.data_ptr()),
                                 len(ids), ctypes.c_void_p(out.data_ptr()))
        return out.to(dtype).view(*index.shape, self.in_features)

    def _picked(self, index: torch.Tensor) -> tuple:
        """Codes, scales and minimums (None for 8 bits) of the outputs ``index``, a row each."""
        mins = None
        if self.mins is not None:
            mins = self._block_rows(self.mins, index)
        return self._code_rows(index), self._block_rows(self.scales, index), mins

    def _code_rows(self, index: torch.Tensor) -> torch.Tensor:
        if self.tile == 0:
            return self.codes[index]
        return tiled_code_rows(self.codes, self.bits, self.tile, index)

    def _block_rows(self, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.tile == 0:
            return values[index].contiguous()
        return tiled_block_rows(values, self.tile, index)


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                      bits: int) -> torch.Tensor:
    """Float32 ``[rows, in]`` values of block codes (packed nibbles for 4 bits)."""
    rows = scales.shape[0]
    if bits == 4:
        low = (codes & 0x0F).view(rows, -1, BLOCK // 2)
        high = (codes >> 4).view(rows, -1, BLOCK // 2)
        values = torch.stack([low, high], dim=2).view(rows, -1, BLOCK).float()
        values = values * scales.unsqueeze(-1) + mins.unsqueeze(-1)
    else:
        values = codes.float().view(rows, -1, BLOCK) * scales.unsqueeze(-1)
    return values.view(rows, -1)


def round_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[m, k]`` as the kernels see it: rounded to 8 bits per block of 32 (float32)."""
    x = x.float().contiguous()
    out = torch.empty_like(x)
    library().mtp_round_rows(ctypes.c_void_p(x.data_ptr()), x.shape[0], x.shape[1],
                             ctypes.c_void_p(out.data_ptr()))
    return out
