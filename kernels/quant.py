"""Weight-only quantized projections: integer codes (or float16), packed for a kernel.

Two forms of the same weight:

- ``QuantizedWeight``: what a loader produces, an ``[out, in]`` weight as codes with a scale (and,
  for 4 bits, a zero) per group of ``group_size`` inputs: ``value = code * scale + zero``. Rows can
  be concatenated and reordered (the q/k/v and gate/up fusions, llama.cpp's rotary row order) and
  it dequantizes exactly to float32.
- ``Int4Linear`` / ``Int8Linear`` / ``Fp16Linear``: the runtime form, packed for one device's
  kernel. ``linear()`` calls them in place of a float ``[in, out]`` weight.

Kernels, PyTorch's own (compared in docs/BENCHMARKS.md): 4 bits, groups of 32..256 with a bf16
scale and zero per group, through ``aten._weight_int4pack_mm_for_cpu`` (CPU) and
``aten._weight_int4pack_mm`` (CUDA); 8 bits, one scale per output row, through
``aten._weight_int8pack_mm`` (CPU); float16 weights through FBGEMM (CPU). The int4 and int8 kernels
read bf16 activations (with float32 ones the int4 CPU kernel takes a slow path), so inputs are cast
and outputs cast back. torchao's weight-only layouts call the same aten kernels on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from mtpserve.kernels.cpu_blocks import BlockLinear

# The int4 kernels keep the code's offset at 8: value = (code - 8) * scale + zero'.
INT4_OFFSET = 8
COMPUTE_DTYPE = torch.bfloat16


class QuantizedWeight(nn.Module):
    """An ``[out, in]`` weight as codes (uint8 0..15 for 4 bits, int8 for 8 bits), float32 scales
    ``[out, in / group_size]`` and, for 4 bits, float32 zeros of the same shape."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bits: int, group_size: int):
        super().__init__()
        self.bits = bits
        self.group_size = group_size
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def index_rows(self, index: torch.Tensor) -> QuantizedWeight:
        zeros = None
        if self.zeros is not None:
            zeros = self.zeros[index]
        return QuantizedWeight(self.codes[index], self.scales[index], zeros, self.bits,
                               self.group_size)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Rows of ``parts`` (of one bit width and group size) one after another."""
        first = parts[0]
        codes = torch.cat([p.codes for p in parts])
        scales = torch.cat([p.scales for p in parts])
        zeros = None
        if first.zeros is not None:
            zeros = torch.cat([p.zeros for p in parts])
        return QuantizedWeight(codes, scales, zeros, first.bits, first.group_size)

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight."""
        out_features, in_features = self.shape
        groups = in_features // self.group_size
        codes = self.codes.float().view(out_features, groups, self.group_size)
        value = codes * self.scales.unsqueeze(-1)
        if self.zeros is not None:
            value = value + self.zeros.unsqueeze(-1)
        return value.view(out_features, in_features)


def quantize(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Round a float ``[out, in]`` weight per group of ``group_size`` inputs: 4 bits asymmetric
    (min/max), 8 bits symmetric (``group_size`` = the input size: one scale per output row)."""
    weight = weight.detach().float().contiguous()
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"input size {in_features} is not a multiple of group size {group_size}")
    groups = weight.view(out_features, in_features // group_size, group_size)
    if bits == 8:
        scales = groups.abs().amax(dim=-1).clamp(min=1e-12) / 127
        scales = scales.to(COMPUTE_DTYPE).float()  # as the kernel will hold them: codes fit it
        codes = torch.round(groups / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(codes.view(out_features, in_features), scales, None, 8,
                               group_size)
    if bits != 4:
        raise ValueError(f"quantization to {bits} bits is not supported (4 or 8)")
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15)
    codes = codes.to(torch.uint8).view(out_features, in_features)
    return QuantizedWeight(codes, scales, low, 4, group_size)


class Int4Linear(nn.Module):
    """A 4-bit weight packed for one device's ``_weight_int4pack_mm``."""

    def __init__(self, weight: QuantizedWeight, device: torch.device):
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = weight.group_size
        codes = weight.codes.to(device)
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 2)
        else:
            pairs = (codes[:, ::2] << 4) | codes[:, 1::2]
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles(in_features))
        # torch's form: (code - 8) * scale + zero', so zero' = zero + 8 * scale; [in/g, out, 2]
        zeros = weight.zeros + INT4_OFFSET * weight.scales
        scales_and_zeros = torch.stack([weight.scales, zeros], dim=-1).transpose(0, 1)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros",
                             scales_and_zeros.contiguous().to(device, COMPUTE_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if rows.device.type == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size,
                                                             self.scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group_size,
                                                     self.scales_and_zeros)
        return _like(out, x)

    def _apply(self, fn, recurse=True):
        """Moves follow ``fn``; the dtype of the scales stays the kernel's."""
        super()._apply(fn, recurse)
        self.scales_and_zeros = self.scales_and_zeros.to(COMPUTE_DTYPE)
        return self


class Int8Linear(nn.Module):
    """An 8-bit weight with one scale per output row, ``[out, in]`` int8. Its rows can be read one
    by one, so it also serves as a tied embedding and as a draft head over a vocabulary subset."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))

    @classmethod
    def of(cls, weight: QuantizedWeight, device: torch.device) -> Int8Linear:
        """Per-row codes of ``weight``. Group-wise codes (llama.cpp's Q8_0, 4-bit ones) are rounded
        again to one scale per row (the error is measured in docs/BENCHMARKS.md)."""
        if weight.bits == 8 and weight.scales.shape[1] == 1:
            return cls(weight.codes.to(device), weight.scales[:, 0].to(device))
        single = quantize(weight.dequantize(), 8, weight.shape[1])
        return cls(single.codes.to(device), single.scales[:, 0].to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if rows.device.type == "cpu":
            out = torch._weight_int8pack_mm(rows, self.codes, self.scales)
        else:
            out = (rows @ self.codes.to(COMPUTE_DTYPE).t()) * self.scales
        return _like(out, x)

    def rows(self, index: torch.Tensor) -> Int8Linear:
        """The projection onto the outputs ``index`` only."""
        return Int8Linear(self.codes[index].contiguous(), self.scales[index])

    def embedding(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``index`` dequantized: ``[len(index), in]``."""
        return self.codes[index].to(dtype) * self.scales[index].to(dtype).unsqueeze(-1)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.scales = self.scales.to(COMPUTE_DTYPE)
        return self


class Fp16Linear(nn.Module):
    """A weight held in float16 for FBGEMM's CPU GEMM (``quantized.linear_dynamic_fp16``): float32
    activations and sums, no activation rounding, so a row's output depends on the other rows of
    the batch only through the order of float32 sums, as with a float32 matmul (FBGEMM's dynamic
    int8 GEMM, faster still, rounds all rows of a call with one scale: not used)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.quantized.linear_dynamic_fp16(_rows(x, torch.float32), self.packed)
        return _like(out, x)


class Fp16Head(Fp16Linear):
    """A vocabulary head in float16: FBGEMM's GEMM for the logits, and the float16 rows kept
    readable for the tied embedding and a reduced draft head (as ``Int8Linear``'s are)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.register_buffer("rows16", weight.half().contiguous())

    def rows(self, index: torch.Tensor) -> Fp16Head:
        return Fp16Head(self.rows16[index].float())

    def embedding(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.rows16[index].to(dtype)


def _rows(x: torch.Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """A kernel's input: ``x`` as rows ``[M, in]`` of ``dtype``."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x.to(dtype)


def _like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernels' ``[M, out]`` output in ``x``'s dtype and leading shape."""
    out = out.to(x.dtype)
    if x.dim() != 2:
        out = out.view(*x.shape[:-1], out.shape[-1])
    return out


def inner_k_tiles(in_features: int) -> int:
    """The CUDA int4 layout's tile count along the input: the largest of 8, 4, 2 that divides."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"input size {in_features} does not fit the int4 kernel's tiles")


def pack(weight: QuantizedWeight, device: torch.device) -> nn.Module:
    """The runtime form of ``weight`` on ``device``."""
    if weight.bits == 4:
        return Int4Linear(weight, device)
    return Int8Linear.of(weight, device)


PACKED = (Int4Linear, Int8Linear, Fp16Linear, BlockLinear)
# heads whose rows can be read: ``rows(index)`` and ``embedding(index, dtype)``
ROW_HEADS = (Int8Linear, Fp16Head, BlockLinear)
