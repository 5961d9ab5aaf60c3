"""llama.cpp's quantized blocks read as codes and scales, without going through float.

Each type below is a group-wise affine code, ``value = code * scale + zero`` per group of 32 inputs,
which is exactly the layout of ``QuantizedWeight``:

- Q4_0: 18-byte blocks, fp16 ``d`` then 16 bytes of nibbles; ``value = (q - 8) * d``.
- Q4_1: 20-byte blocks, fp16 ``d``, fp16 ``m``, 16 bytes; ``value = q * d + m``.
- Q4_K: 144-byte super-blocks of 256 values, fp16 ``d`` and ``dmin``, twelve bytes of 6-bit
  sub-scales and sub-mins, 128 bytes of nibbles; ``value = q * d * sc - dmin * m`` per 32 values.
- Q8_0: 34-byte blocks, fp16 ``d`` then 32 int8; ``value = q * d``.

In the 32-value blocks byte ``j`` holds value ``j`` in its low nibble and value ``j + 16`` in its
high one; a Q4_K super-block stores four 64-value chunks of 32 bytes, low nibbles first.
Other types return None and are dequantized by the gguf package.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import Q4_K

from mtpserve.kernels.quant import QuantizedWeight

GROUP = 32


def read_quantized(tensor) -> QuantizedWeight | None:
    """A 2-D GGUF tensor of a type listed above as an ``[out, in]`` QuantizedWeight."""
    qtype = tensor.tensor_type
    readers = {
        GGMLQuantizationType.Q4_0: _q4_0,
        GGMLQuantizationType.Q4_1: _q4_1,
        GGMLQuantizationType.Q4_K: _q4_k,
        GGMLQuantizationType.Q8_0: _q8_0,
    }
    if qtype not in readers or len(tensor.shape) != 2:
        return None
    in_features, out_features = (int(d) for d in tensor.shape)
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(out_features, -1)
    codes, scales, zeros, bits = readers[qtype](raw, out_features)
    codes = codes.reshape(out_features, in_features)
    return QuantizedWeight(codes, scales.reshape(out_features, -1),
                           _optional(zeros, out_features), bits, GROUP)


def _optional(zeros, out_features):
    if zeros is None:
        return None
    return zeros.reshape(out_features, -1)


def _blocks(raw: np.ndarray, out_features: int, block_bytes: int) -> np.ndarray:
    return raw.reshape(out_features, -1, block_bytes)


def _half(raw: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 pairs ``[..., 2]`` as float32."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(raw: np.ndarray) -> torch.Tensor:
    """``[..., 16]`` bytes as ``[..., 32]`` codes: low nibbles, then high ones."""
    data = torch.from_numpy(np.ascontiguousarray(raw))
    return torch.cat([data & 0x0F, data >> 4], dim=-1)


def _q4_0(raw, out_features):
    blocks = _blocks(raw, out_features, 18)
    scales = _half(blocks[..., 0:2])
    codes = _nibbles(blocks[..., 2:])
    return codes, scales, -8 * scales, 4


def _q4_1(raw, out_features):
    blocks = _blocks(raw, out_features, 20)
    scales = _half(blocks[..., 0:2])
    zeros = _half(blocks[..., 2:4])
    codes = _nibbles(blocks[..., 4:])
    return codes, scales, zeros, 4


def _q8_0(raw, out_features):
    blocks = _blocks(raw, out_features, 34)
    scales = _half(blocks[..., 0:2])
    codes = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8))
    return codes, scales, None, 8


def _q4_k(raw, out_features):
    blocks = _blocks(raw, out_features, 144)
    d = _half(blocks[..., 0:2]).unsqueeze(-1)
    dmin = _half(blocks[..., 2:4]).unsqueeze(-1)
    flat = blocks.reshape(-1, 144)
    sub_scales, sub_mins = Q4_K.get_scale_min(flat[:, 4:16])
    sub_scales = torch.from_numpy(sub_scales.astype(np.float32)).view(d.shape[0], -1, 8)
    sub_mins = torch.from_numpy(sub_mins.astype(np.float32)).view(d.shape[0], -1, 8)
    chunks = blocks[..., 16:].reshape(out_features, -1, 4, 32)
    data = torch.from_numpy(np.ascontiguousarray(chunks))
    codes = torch.stack([data & 0x0F, data >> 4], dim=-2)  # [out, super, 4, 2, 32]
    return codes, d * sub_scales, -(dmin * sub_mins), 4
