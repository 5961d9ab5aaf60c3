"""RMSNorm in Triton, optionally fused with the residual add before it: one read of each row.

The PyTorch twins are ``rms_norm`` and ``add_rms_norm`` (``kernels/rmsnorm.py``), with their
rounding: sums of squares in float32; half-precision rows normalized in float32 and rounded before
the weight multiplies them; the residual sum rounded to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [N, D] normalized rows
    sum_ptr,  # [N, D] x + residual, written when HAS_RESIDUAL
    x_ptr,  # [N, D]
    residual_ptr,  # [N, D], read when HAS_RESIDUAL
    weight_ptr,  # [D]
    stride_o, stride_s, stride_x, stride_r,
    eps,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    HAS_RESIDUAL: tl.constexpr,
    HALF: tl.constexpr,  # x is float16 or bfloat16
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (xf + r.to(tl.float32)).to(dtype)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
        xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / D + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = xf * rstd
    if HALF:
        normed = normed.to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """x: [..., D], weight: [D] -> normalized x in x's dtype; with ``residual`` (x's shape),
    ``(rms_norm(x + residual), x + residual)``."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    summed = out
    res_rows = rows
    if residual is not None:
        res_rows = residual.reshape(rows.shape)
        if res_rows.stride(-1) != 1:
            res_rows = res_rows.contiguous()
        summed = torch.empty_like(out)
    _rms_norm_kernel[(rows.shape[0],)](
        out, summed, rows, res_rows, weight,
        out.stride(0), summed.stride(0), rows.stride(0), res_rows.stride(0),
        eps,
        D=shape[-1], BLOCK_D=triton.next_power_of_2(shape[-1]),
        HAS_RESIDUAL=residual is not None, HALF=x.dtype in (torch.float16, torch.bfloat16),
    )
    if residual is None:
        return out.view(shape)
    return out.view(shape), summed.view(shape)
