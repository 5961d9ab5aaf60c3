"""RMSNorm (PyTorch reference)."""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D], weight: [D]. Computed in float32 (or wider), returned in x's dtype.

    Half-precision inputs are normalized in float32 and rounded before the weight multiplies them,
    as transformers does; float32 and float64 take PyTorch's fused kernel (one op, the same
    values)."""
    dtype = x.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add before a norm: ``(rms_norm(x + residual), x + residual)``, the sum in x's
    dtype (the twin of the fused Triton kernel)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed
