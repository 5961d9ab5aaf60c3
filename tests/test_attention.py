"""Paged attention against attention computed by hand over each sequence's full keys and values."""

import pytest
import torch

from mtpserve.kernels.attention import SHORT_QUERY, AttentionMetadata, TorchPagedAttention

BLOCK, HEADS, KV_HEADS, DIM = 4, 4, 2, 8


def reference(q, keys, values, scale):
    """q [n, H, D] are the last n positions of a sequence whose keys/values are [L, KV, D]."""
    n, length = q.shape[0], keys.shape[0]
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1)
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    visible = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


def run_step(query_lens, context_lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    seq_lens = [c + n for c, n in zip(context_lens, query_lens)]
    blocks_per_seq = [-(-s // BLOCK) for s in seq_lens]
    order = torch.randperm(sum(blocks_per_seq), generator=gen).tolist()  # blocks scattered in the pool
    tables, at = [], 0
    for n in blocks_per_seq:
        tables.append(order[at:at + n])
        at += n
    cache = (rand(len(order) + 3, BLOCK, KV_HEADS, DIM), rand(len(order) + 3, BLOCK, KV_HEADS, DIM))
    full_k = [rand(s, KV_HEADS, DIM) for s in seq_lens]
    full_v = [rand(s, KV_HEADS, DIM) for s in seq_lens]
    for table, fk, fv, c in zip(tables, full_k, full_v, context_lens):  # the cached context
        for p in range(c):
            cache[0][table[p // BLOCK], p % BLOCK] = fk[p]
            cache[1][table[p // BLOCK], p % BLOCK] = fv[p]
    slots = []
    for table, c, n in zip(tables, context_lens, query_lens):
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(c, c + n)]
    width = max(blocks_per_seq)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                                    dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0] + query_lens).cumsum(0).int(), query_lens=query_lens,
        seq_lens_host=seq_lens, block_size=BLOCK)
    q = rand(sum(query_lens), HEADS, DIM)
    k = torch.cat([fk[c:] for fk, c in zip(full_k, context_lens)])
    v = torch.cat([fv[c:] for fv, c in zip(full_v, context_lens)])
    attn = TorchPagedAttention()
    attn.prepare(meta)
    out = attn.forward(q, k, v, cache, 0.3)
    expected, start = [], 0
    for n, fk, fv in zip(query_lens, full_k, full_v):
        expected.append(reference(q[start:start + n], fk, fv, 0.3))
        start += n
    return out, torch.cat(expected)


@pytest.mark.parametrize("query_lens,context_lens", [
    ([1, 1, 1], [5, 5, 5]),  # decodes, equal lengths: no mask
    ([1, 1, 1, 1], [3, 9, 0, 14]),  # decodes of different lengths
    ([4, 2, 1, 4], [6, 11, 7, 0]),  # verify rows of different lengths, a decode, a short prompt
    ([1, 3, SHORT_QUERY, SHORT_QUERY + 1, 40, 2], [10, 4, 3, 0, 5, 21]),  # short and long together
    ([23], [0]),  # one prompt
])
def test_matches_attention_by_hand(query_lens, context_lens):
    out, expected = run_step(query_lens, context_lens)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

