"""Rotary position embeddings in Triton: rotate-half (NeoX/HF) on the first ``rotary_dim`` dims of
every head of a token, the other dims copied.

The PyTorch twin is ``apply_rotary`` (``kernels/rotary.py``), with the same tables: the rows of
``signed_tables`` at the tokens' positions, ``cos = [c, c]`` and ``sin = [-s, s]``. Products and
sums are in float32, rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    out_ptr,  # [T, H, D]
    x_ptr,  # [T, H, D] (any token and head strides)
    cos_ptr,  # [T, R] the [c, c] rows of the tokens' positions
    sin_ptr,  # [T, R] the [-s, s] rows
    stride_ot, stride_oh,
    stride_xt, stride_xh,
    stride_ct, stride_st,
    H: tl.constexpr,
    D: tl.constexpr,
    HALF: tl.constexpr,  # R // 2
    BLOCK_H: tl.constexpr,  # H rounded up to a power of two
    BLOCK_HALF: tl.constexpr,  # HALF rounded up to a power of two
    BLOCK_TAIL: tl.constexpr,  # D - R rounded up to a power of two (at least 1)
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < HALF
    mask = (heads[:, None] < H) & dim_ok[None, :]
    x_row = x_ptr + token * stride_xt + heads[:, None] * stride_xh
    o_row = out_ptr + token * stride_ot + heads[:, None] * stride_oh
    first = tl.load(x_row + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    second = tl.load(x_row + HALF + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    cos_first = tl.load(cos_ptr + token * stride_ct + dims, mask=dim_ok, other=0.0).to(tl.float32)
    cos_second = tl.load(cos_ptr + token * stride_ct + HALF + dims, mask=dim_ok, other=0.0)
    sin_first = tl.load(sin_ptr + token * stride_st + dims, mask=dim_ok, other=0.0).to(tl.float32)
    sin_second = tl.load(sin_ptr + token * stride_st + HALF + dims, mask=dim_ok, other=0.0)
    out_first = first * cos_first[None, :] + second * sin_first[None, :]
    out_second = (second * cos_second.to(tl.float32)[None, :]
                  + first * sin_second.to(tl.float32)[None, :])
    dtype = out_ptr.dtype.element_ty
    tl.store(o_row + dims[None, :], out_first.to(dtype), mask=mask)
    tl.store(o_row + HALF + dims[None, :], out_second.to(dtype), mask=mask)
    if D > 2 * HALF:  # the dims past rotary_dim pass through
        tail = tl.arange(0, BLOCK_TAIL)
        tail_mask = (heads[:, None] < H) & (tail[None, :] < D - 2 * HALF)
        rest = tl.load(x_row + 2 * HALF + tail[None, :], mask=tail_mask, other=0.0)
        tl.store(o_row + 2 * HALF + tail[None, :], rest.to(dtype), mask=tail_mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, rotary_dim] -> rotated x (a new tensor)."""
    tokens, heads, head_dim = x.shape
    half = cos.shape[-1] // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos.contiguous()
    sin = sin.contiguous()
    out = torch.empty((tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    _rotary_kernel[(tokens,)](
        out, x, cos, sin,
        out.stride(0), out.stride(1),
        x.stride(0), x.stride(1),
        cos.stride(0), sin.stride(0),
        H=heads, D=head_dim, HALF=half,
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_TAIL=triton.next_power_of_2(max(1, head_dim - 2 * half)),
    )
    return out
