"""Quantized weights: llama.cpp's blocks decoded against the gguf package's own dequantizer, and the
packed int4 / int8 projections against a float64 reference of the same codes."""

from __future__ import annotations

from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from mtpserve.engine.loader.gguf import default_gguf_path
from mtpserve.engine.loader.gguf_quant import read_quantized
from mtpserve.kernels.linear import linear
from mtpserve.kernels.quant import (
    COMPUTE_DTYPE,
    Fp16Head,
    Int4Linear,
    Int8Linear,
    QuantizedWeight,
    quantize,
)

OUT, IN = 96, 256


def gguf_tensor(qtype, raw: np.ndarray, out_features: int, in_features: int):
    """What GGUFReader hands the loader: the type, dims in GGUF order, the raw bytes per row."""
    return SimpleNamespace(tensor_type=qtype, shape=[in_features, out_features], data=raw,
                           name="w")


def reference_dequantize(tensor) -> torch.Tensor:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(values.reshape(tensor.shape[1], tensor.shape[0]).astype(np.float32))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_blocks_decode_exactly_as_gguf_dequantizes(qtype):
    weights = np.random.default_rng(0).standard_normal((OUT, IN)).astype(np.float32)
    tensor = gguf_tensor(qtype, gguf.quants.quantize(weights, qtype), OUT, IN)
    decoded = read_quantized(tensor)
    assert decoded.shape == (OUT, IN)
    assert decoded.bits == (8 if qtype == T.Q8_0 else 4)
    assert torch.equal(decoded.dequantize(), reference_dequantize(tensor))


def test_q4_k_super_blocks_decode_exactly_as_gguf_dequantizes():
    """Random Q4_K bytes (gguf has no Q4_K quantizer), with finite fp16 d and dmin."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(OUT, IN // 256, 144), dtype=np.uint8)
    halves = rng.uniform(0.001, 0.1, size=(OUT, IN // 256, 2)).astype(np.float16)
    blocks[..., 0:4] = halves.view(np.uint8).reshape(OUT, IN // 256, 4)
    tensor = gguf_tensor(T.Q4_K, blocks.reshape(OUT, -1), OUT, IN)
    decoded = read_quantized(tensor)
    assert torch.equal(decoded.dequantize(), reference_dequantize(tensor))


def test_unsupported_types_are_left_to_the_float_path():
    weights = np.random.default_rng(0).standard_normal((OUT, IN)).astype(np.float32)
    tensor = gguf_tensor(T.Q5_0, gguf.quants.quantize(weights, T.Q5_0), OUT, IN)
    assert read_quantized(tensor) is None


def test_every_matrix_of_the_default_model_decodes_exactly():
    """The shipped SmolLM2 file: Q4_1 layers and a Q8_0 tied embedding."""
    reader = gguf.GGUFReader(default_gguf_path())
    seen = set()
    for tensor in reader.tensors:
        if len(tensor.shape) != 2:
            continue
        decoded = read_quantized(tensor)
        seen.add(tensor.tensor_type.name)
        ref = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert torch.equal(decoded.dequantize(), torch.from_numpy(ref.astype(np.float32))), tensor.name
    assert seen == {"Q4_1", "Q8_0"}


def bf16_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the kernels compute, in float64: bf16 inputs times the weight [out, in]."""
    return x.to(COMPUTE_DTYPE).double() @ weight.double().t()


def int4_weight_as_the_kernel_sees_it(weight: QuantizedWeight) -> torch.Tensor:
    """Scales and zeros rounded to bf16 as the kernel stores them: (code - 8) * s + (zero + 8 s)."""
    scales = weight.scales.to(COMPUTE_DTYPE).double()
    zeros = (weight.zeros + 8 * weight.scales).to(COMPUTE_DTYPE).double()
    codes = weight.codes.double().view(OUT, -1, weight.group_size) - 8
    return (codes * scales.unsqueeze(-1) + zeros.unsqueeze(-1)).view(OUT, IN)


@pytest.mark.parametrize("rows", [1, 4, 17])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
def test_int4_linear_matches_its_codes(qtype, rows):
    weights = np.random.default_rng(2).standard_normal((OUT, IN)).astype(np.float32)
    decoded = read_quantized(gguf_tensor(qtype, gguf.quants.quantize(weights, qtype), OUT, IN))
    layer = Int4Linear(decoded, torch.device("cpu"))
    x = torch.randn(rows, IN)
    out = linear(x, layer)
    assert out.dtype == torch.float32 and out.shape == (rows, OUT)
    want = bf16_reference(x, int4_weight_as_the_kernel_sees_it(decoded))
    # fp32 accumulation, one bf16 rounding of the output: relative error below 2**-7
    torch.testing.assert_close(out.double(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
    # and against the exact float weight, only the bf16 rounding of scales and inputs remains
    exact = x.double() @ decoded.dequantize().double().t()
    assert (out.double() - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_linear_matches_its_codes(rows):
    weight = quantize(torch.randn(OUT, IN), 8, IN)
    layer = Int8Linear.of(weight, torch.device("cpu"))
    x = torch.randn(rows, IN)
    want = bf16_reference(x, weight.codes.double() * weight.scales.to(COMPUTE_DTYPE).double())
    torch.testing.assert_close(linear(x, layer).double(), want, rtol=2**-7,
                               atol=2**-7 * want.abs().max().item())


def test_q8_0_groups_fold_into_one_scale_per_row_within_half_a_step():
    weights = np.random.default_rng(3).standard_normal((OUT, IN)).astype(np.float32)
    decoded = read_quantized(gguf_tensor(T.Q8_0, gguf.quants.quantize(weights, T.Q8_0), OUT, IN))
    layer = Int8Linear.of(decoded, torch.device("cpu"))
    step = layer.scales.float().unsqueeze(-1)
    per_row = layer.codes.float() * step
    error = (per_row - decoded.dequantize()).abs()
    assert (error <= step / 2 * 1.01 + 1e-6).all()


def test_int8_rows_serve_as_embedding_and_as_a_vocabulary_subset():
    weight = quantize(torch.randn(OUT, IN), 8, IN)
    layer = Int8Linear.of(weight, torch.device("cpu"))
    ids = torch.tensor([5, 0, 77])
    dequantized = weight.codes.float() * weight.scales.to(COMPUTE_DTYPE).float()
    torch.testing.assert_close(layer.embedding(ids, torch.float32), dequantized[ids])
    x = torch.randn(3, IN)
    torch.testing.assert_close(linear(x, layer.rows(ids)), linear(x, layer)[:, ids])


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_rounding_a_float_weight_to_int4_errs_by_at_most_half_a_step(group_size):
    weight = torch.randn(OUT, IN)
    q = quantize(weight, 4, group_size)
    assert q.codes.min() >= 0 and q.codes.max() <= 15
    step = q.scales.repeat_interleave(group_size, dim=1)
    assert ((q.dequantize() - weight).abs() <= step / 2 + 1e-6).all()


def test_fused_rows_and_row_order_follow_the_float_weights():
    a = quantize(torch.randn(32, IN), 4, 32)
    b = quantize(torch.randn(64, IN), 4, 32)
    fused = QuantizedWeight.cat([a, b])
    torch.testing.assert_close(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    order = torch.randperm(96)
    torch.testing.assert_close(fused.index_rows(order).dequantize(), fused.dequantize()[order])


def test_module_casts_keep_the_kernels_dtype():
    layer = Int4Linear(quantize(torch.randn(OUT, IN), 4, 32), torch.device("cpu"))
    holder = torch.nn.Module()
    holder.proj = layer
    holder.to(torch.float32)
    assert layer.scales_and_zeros.dtype == COMPUTE_DTYPE
    assert linear(torch.randn(2, IN, dtype=torch.float64), layer).dtype == torch.float64


def test_fp16_head_rows_are_its_float16_weights():
    weight = torch.randn(OUT, IN)
    head = Fp16Head(weight)
    x = torch.randn(3, IN)
    want = x.double() @ weight.half().double().t()
    torch.testing.assert_close(linear(x, head).double(), want, rtol=1e-5, atol=1e-4)
    ids = torch.tensor([7, 1, 90])
    assert torch.equal(head.embedding(ids, torch.float32), weight.half().float()[ids])
    torch.testing.assert_close(linear(x, head.rows(ids)), linear(x, head)[:, ids])
