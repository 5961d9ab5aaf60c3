"""Dense projections with weights stored transposed, ``[in_features, out_features]``.

Measured on a 2-core CPU (PyTorch 2.13, MKL, float32, SmolLM2 shapes):

- ``x @ w_t`` with a contiguous ``[in, out]`` weight runs the one-token (GEMV) case about twice as
  fast as ``F.linear`` with the usual ``[out, in]`` layout, and is as fast for prefill-sized inputs.
- MKL runs a float32 GEMV on one thread. Splitting the reduction dimension into one slice per
  thread and running the slices as a batched matmul (``bmm`` parallelizes over the batch) uses every
  core: another ~1.5x for up to a few dozen tokens (decode and MTP verification). The weight slices
  are views, so nothing is copied.
"""

import torch

from mtpserve.kernels.quant import PACKED

# Up to this many rows the split-reduction path wins; beyond it one big matmul is as fast.
SPLIT_K_MAX_ROWS = 32
# Below this many weight elements a matmul is too small to be worth splitting across threads.
SPLIT_K_MIN_WEIGHT = 1 << 18


def linear(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [..., in], weight_t: [in, out] (or a packed quantized weight), bias: [out] -> [..., out]."""
    if isinstance(weight_t, PACKED):
        out = weight_t(x)
        if bias is not None:
            out = out + bias
        return out
    in_features, out_features = weight_t.shape
    rows = x.numel() // in_features
    parts = torch.get_num_threads()
    if _split_k(x, weight_t, rows, parts):
        xs = x.reshape(rows, parts, in_features // parts).transpose(0, 1)  # [parts, rows, in/parts]
        out = torch.bmm(xs, weight_t.view(parts, in_features // parts, out_features)).sum(0)
        out = out.view(*x.shape[:-1], out_features)
    else:
        out = x @ weight_t
    if bias is not None:
        out = out + bias
    return out


def _split_k(x: torch.Tensor, weight_t: torch.Tensor, rows: int, parts: int) -> bool:
    """Whether to split the reduction across ``parts`` threads: few rows, a big float weight."""
    if parts <= 1 or rows > SPLIT_K_MAX_ROWS or weight_t.numel() < SPLIT_K_MIN_WEIGHT:
        return False
    if weight_t.shape[0] % parts != 0 or x.device.type != "cpu":
        return False
    return weight_t.dtype in (torch.float32, torch.float64)
