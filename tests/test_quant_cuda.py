"""The packed projections on CUDA (skipped without a GPU): the int4 layout of
``aten._weight_int4pack_mm`` and the int8 path against a float64 reference of the same codes, and the
same outputs as on the CPU."""

from __future__ import annotations

import pytest
import torch

from mtpserve.kernels.linear import linear
from mtpserve.kernels.quant import COMPUTE_DTYPE, Int4Linear, Int8Linear, quantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

OUT, IN = 256, 512
CUDA = torch.device("cuda")


@pytest.mark.parametrize("rows", [1, 4, 33])
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_on_cuda_matches_its_codes_and_the_cpu(rows, group_size):
    weight = quantize(torch.randn(OUT, IN), 4, group_size)
    x = torch.randn(rows, IN)
    scales = weight.scales.to(COMPUTE_DTYPE).double()
    zeros = (weight.zeros + 8 * weight.scales).to(COMPUTE_DTYPE).double()
    codes = weight.codes.double().view(OUT, -1, group_size) - 8
    kernel_weight = (codes * scales.unsqueeze(-1) + zeros.unsqueeze(-1)).view(OUT, IN)
    want = x.to(COMPUTE_DTYPE).double() @ kernel_weight.t()
    got = linear(x.to(CUDA), Int4Linear(weight, CUDA)).cpu().double()
    tolerance = 2**-7 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=2**-7, atol=tolerance)
    on_cpu = linear(x, Int4Linear(weight, torch.device("cpu"))).double()
    torch.testing.assert_close(got, on_cpu, rtol=2**-7, atol=tolerance)


def test_int8_on_cuda_matches_its_codes():
    weight = quantize(torch.randn(OUT, IN), 8, IN)
    layer = Int8Linear.of(weight, CUDA)
    x = torch.randn(5, IN)
    dequantized = weight.codes.double() * weight.scales.to(COMPUTE_DTYPE).double()
    want = x.to(COMPUTE_DTYPE).double() @ dequantized.t()
    got = linear(x.to(CUDA), layer).cpu().double()
    torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
    ids = torch.tensor([3, 0, 200], device=CUDA)
    torch.testing.assert_close(layer.embedding(ids, torch.float32).cpu(),
                               dequantized.float()[ids.cpu()], rtol=1e-6, atol=1e-6)
