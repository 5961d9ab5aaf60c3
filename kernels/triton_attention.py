"""Paged attention in Triton: one kernel for decode, verification and (chunked) prefill.

The PyTorch twin is ``TorchPagedAttention`` (``kernels/attention.py``): the same flattened tokens,
``query_start_loc``, ``seq_lens`` and ``block_tables``, the same causal rule (query ``j`` of a
sequence that computes ``q_len`` new tokens sits at position ``seq_len - q_len + j`` and sees keys
``0..`` that position), so verify rows are causal among the drafts.

A program owns one tile of ``BLOCK_Q`` query tokens of one sequence and one KV head. Its rows are
those tokens times the query heads that share the KV head (grouped-query attention): each key block
is read once for the whole group. Keys are walked ``BLOCK_N`` positions at a time, each position
found through the block table, with an online softmax in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Smallest tile of tl.dot on every backend.
MIN_DOT = 16
# Most query rows (tokens x grouped heads) per program.
MAX_ROWS = 64


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 sums; UPCAST multiplies in float32 (exact for half inputs): Triton's
    interpreter multiplies bfloat16 blocks as their integer bits."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [T, H, D] the attention output
    q_ptr,  # [T, H, D] queries of the step's tokens
    k_cache_ptr,  # [num_blocks, block_size, KVH, D]
    v_cache_ptr,  # [num_blocks, block_size, KVH, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32, cached + new tokens of each sequence
    query_start_loc_ptr,  # [B + 1] int32, where each sequence's tokens start in the step
    scale,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    block_size,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_N: tl.constexpr,  # key positions per iteration
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" keeps float32 exact (no TF32)
    UPCAST: tl.constexpr,  # products in float32 (see _dot)
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_index = tile * BLOCK_Q + rows // GROUP_PAD  # query token within the sequence
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (q_index < q_len) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    token = q_start + q_index
    q_offsets = token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q_pos = context + q_index  # absolute position of each row

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], dtype=tl.float32)
    # the last row of the tile sees keys up to its own position, no further
    key_end = tl.minimum(context + (tile + 1) * BLOCK_Q, seq_len)
    for key_start in range(0, key_end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_ok = keys < key_end
        block = tl.load(block_tables_ptr + seq * stride_bt + keys // block_size, mask=key_ok, other=0)
        block = block.to(tl.int64)  # block * stride can pass 2**31 in a large cache
        within = keys % block_size
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k_offsets = block[:, None] * stride_kb + within[:, None] * stride_ks + kv_head * stride_kh
        k = tl.load(k_cache_ptr + k_offsets + dims[None, :], mask=kv_mask, other=0.0)
        v_offsets = block[:, None] * stride_vb + within[:, None] * stride_vs + kv_head * stride_vh
        v = tl.load(v_cache_ptr + v_offsets + dims[None, :], mask=kv_mask, other=0.0)
        scores = _dot(q, tl.trans(k.to(q.dtype)), PRECISION, UPCAST) * scale
        visible = (keys[None, :] <= q_pos[:, None]) & key_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        # every row sees key 0, so m_new is finite from the first iteration on
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v.to(q.dtype), PRECISION, UPCAST)
        m_i = m_new

    out = acc / l_i[:, None]
    o_offsets = token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


# kernels run by Triton's interpreter (TRITON_INTERPRET=1 when they were defined)
INTERPRETED = isinstance(_paged_attention_kernel, InterpretedFunction)


def tile_shape(max_query_len: int, group: int) -> tuple[int, int]:
    """(GROUP_PAD, BLOCK_Q): query tokens per program so that a tile holds at least MIN_DOT rows
    and, for long queries, MAX_ROWS."""
    group_pad = triton.next_power_of_2(group)
    rows = triton.next_power_of_2(max_query_len * group_pad)
    rows = min(max(rows, MIN_DOT), max(MAX_ROWS, group_pad))
    return group_pad, max(1, rows // group_pad)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 products in full precision (the twin's); half types have one precision."""
    if dtype == torch.float32:
        return "ieee"
    return "tf32"


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the step's queries over each sequence's paged keys and values (the new tokens'
    K/V already written to the cache).

    q: [T, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D]; block_tables: [B, max_blocks]
    int32; seq_lens: [B] int32; query_start_loc: [B + 1] int32; ``max_query_len``: the longest
    query of the step (host). Returns [T, H, D] in q's dtype."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    group_pad, block_q = tile_shape(max_query_len, group)
    block_d = max(MIN_DOT, triton.next_power_of_2(head_dim))
    block_n = 64 if block_d <= 128 else 32
    num_seqs = seq_lens.shape[0]
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        k_cache.shape[1],
        HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group, GROUP_PAD=group_pad,
        BLOCK_Q=block_q, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
    )
    return out
