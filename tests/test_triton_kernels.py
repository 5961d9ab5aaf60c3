"""The Triton kernels against their PyTorch twins: on CUDA when there is one, else on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``, set here before the kernels are defined).
Shapes are small so the interpreter stays fast; skipped when triton is not installed."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mtpserve.kernels.attention import TorchPagedAttention, build_metadata  # noqa: E402
from mtpserve.kernels.attention import write_kv as torch_write_kv  # noqa: E402
from mtpserve.kernels.rmsnorm import add_rms_norm  # noqa: E402
from mtpserve.kernels.rmsnorm import rms_norm as torch_rms_norm  # noqa: E402
from mtpserve.kernels.rotary import apply_rotary as torch_apply_rotary  # noqa: E402
from mtpserve.kernels.rotary import rope_cos_sin, signed_tables  # noqa: E402
from mtpserve.kernels.triton_backend import TritonPagedAttention  # noqa: E402
from mtpserve.kernels.triton_kv import write_kv  # noqa: E402
from mtpserve.kernels.triton_norm import rms_norm  # noqa: E402
from mtpserve.kernels.triton_rotary import apply_rotary  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# float32 within rounding of the sum order; half types within a few of their ulps
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def paged_step(query_lens, context_lens, block_size, heads, kv_heads, head_dim, dtype, seed=0):
    """A step over sequences whose blocks lie scattered in a pool of random K/V: the metadata,
    the queries and new K/V, and the caches."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(context_lens, query_lens)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    order = torch.randperm(sum(blocks_per_seq) + 3, generator=gen).tolist()
    tables, at = [], 0
    for n in blocks_per_seq:
        tables.append(order[at:at + n])
        at += n
    meta, _ = build_metadata(tables, context_lens, query_lens, block_size, DEVICE)
    num_tokens = sum(query_lens)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    cache_shape = (len(order), block_size, kv_heads, head_dim)
    caches = (rand(*cache_shape), rand(*cache_shape))
    # k and v as the model passes them: views into one fused projection
    qkv = rand(num_tokens, heads + 2 * kv_heads, head_dim)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    return meta, q, k, v, caches


def run(backend, meta, q, k, v, caches, scale):
    caches = tuple(c.clone() for c in caches)
    backend.prepare(meta)
    out = backend.forward(q, k, v, caches, scale)
    return out, caches


def assert_close(got, want, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_lens,context_lens", [
    ([1, 1, 1], [5, 0, 37]),  # decodes (and a first token)
    ([4, 2, 1, 4], [6, 11, 7, 0]),  # verify rows (k + 1 each), a decode, a short prompt
    ([70], [0]),  # a prompt of several query tiles
    ([1, 19, 4, 33], [40, 13, 21, 2]),  # a decode, prompt chunks and verify rows in one step
])
def test_paged_attention_matches_torch(query_lens, context_lens, dtype):
    meta, q, k, v, caches = paged_step(query_lens, context_lens, 4, 4, 2, 16, dtype)
    want, want_caches = run(TorchPagedAttention(), meta, q, k, v, caches, 0.25)
    got, got_caches = run(TritonPagedAttention(), meta, q, k, v, caches, 0.25)
    assert_close(got, want, dtype)
    assert torch.equal(got_caches[0], want_caches[0])
    assert torch.equal(got_caches[1], want_caches[1])


@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim", [
    (16, 9, 3, 8),  # groups of 3 heads (SmolLM2-135M's layout), head_dim below a dot tile
    (8, 4, 4, 24),  # no grouping, head_dim not a power of two
    (4, 32, 1, 16),  # one KV head for 32 query heads: a tile of one token
])
def test_paged_attention_layouts(block_size, heads, kv_heads, head_dim):
    meta, q, k, v, caches = paged_step([3, 1, 9], [17, 30, 0], block_size, heads, kv_heads,
                                       head_dim, torch.float32, seed=1)
    scale = head_dim ** -0.5
    want, _ = run(TorchPagedAttention(), meta, q, k, v, caches, scale)
    got, _ = run(TritonPagedAttention(), meta, q, k, v, caches, scale)
    assert_close(got, want, torch.float32)


def test_paged_attention_float16():
    meta, q, k, v, caches = paged_step([3, 1, 9], [17, 30, 0], 4, 4, 2, 16, torch.float16)
    want, _ = run(TorchPagedAttention(), meta, q, k, v, caches, 0.25)
    got, _ = run(TritonPagedAttention(), meta, q, k, v, caches, 0.25)
    assert_close(got, want, torch.float16)


def test_write_kv_skips_minus_one():
    meta, _, k, v, caches = paged_step([3, 5], [2, 6], 4, 4, 2, 16, torch.float32)
    slots = meta.slot_mapping.clone()
    slots[1] = -1
    slots[6] = -1
    want = tuple(c.clone() for c in caches)
    torch_write_kv(k, v, want, slots)
    got = tuple(c.clone() for c in caches)
    write_kv(k, v, got, slots)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    # the skipped tokens' slots kept their old contents
    flat = got[0].view(-1, *got[0].shape[2:])
    old = caches[0].view(-1, *caches[0].shape[2:])
    assert torch.equal(flat[meta.slot_mapping[1]], old[meta.slot_mapping[1]])
    assert not torch.equal(flat[meta.slot_mapping[0]], old[meta.slot_mapping[0]])


def test_write_kv_casts_to_the_cache_dtype():
    meta, _, k, v, caches = paged_step([4], [3], 4, 2, 2, 16, torch.float32)
    half = tuple(c.to(torch.bfloat16) for c in caches)
    want = tuple(c.clone() for c in half)
    torch_write_kv(k, v, want, meta.slot_mapping)
    write_kv(k, v, half, meta.slot_mapping)
    if DEVICE.type == "cuda":
        assert torch.equal(half[0], want[0])
        assert torch.equal(half[1], want[1])
    else:  # the interpreter rounds toward zero: within one bfloat16 step
        torch.testing.assert_close(half[0], want[0], rtol=2**-7, atol=0)
        torch.testing.assert_close(half[1], want[1], rtol=2**-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 48])
def test_rms_norm_matches_torch(dtype, dim):
    gen = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(5, 3, dim, generator=gen)).to(DEVICE, dtype)
    residual = torch.randn(5, 3, dim, generator=gen).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(dim, generator=gen)).to(DEVICE, dtype)
    assert_close(rms_norm(x, weight, 1e-6), torch_rms_norm(x, weight, 1e-6), dtype)
    got, got_sum = rms_norm(x, weight, 1e-6, residual)
    want, want_sum = add_rms_norm(x, residual, weight, 1e-6)
    assert_close(got, want, dtype)
    assert_close(got_sum, want_sum, dtype)
    if DEVICE.type == "cuda":  # one rounding of an exact float32 sum, as torch's
        assert torch.equal(got_sum, want_sum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (32, 8), (24, 12)])
def test_rotary_matches_torch(dtype, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(3)
    cos, sin = signed_tables(*rope_cos_sin(rotary_dim, 10000.0, 64, None, 64))
    positions = torch.tensor([0, 5, 17, 63, 2])
    cos = cos[positions].to(DEVICE, dtype)
    sin = sin[positions].to(DEVICE, dtype)
    # q and k of a fused projection: strided views, as the model passes them
    qk = torch.randn(5, 6, head_dim, generator=gen).to(DEVICE, dtype)
    q = qk[:, :4]
    assert_close(apply_rotary(q, cos, sin), torch_apply_rotary(q, cos, sin), dtype)
    assert_close(apply_rotary(qk, cos, sin), torch_apply_rotary(qk, cos, sin), dtype)
