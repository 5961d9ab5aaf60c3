"""Paged attention: the backend interface and the PyTorch reference backend.

The cache of one layer is a pair of tensors ``[num_blocks, block_size, kv_heads, head_dim]``.
Tokens of a step are flattened (``[T, ...]``); ``query_start_loc`` splits them per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token (-1 = do not write)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step (cached + new)
    query_start_loc: torch.Tensor  # [B + 1] int32
    query_lens: list[int]  # host copy, per sequence
    seq_lens_host: list[int]  # host copy of seq_lens
    block_size: int
    recurrent: object | None = None  # linear-attention state slots of the sequences (hybrid models)

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens)


class AttentionBackend:
    """Interface: ``prepare`` once per step, ``forward`` once per layer."""

    meta: AttentionMetadata | None = None  # the step's metadata (None: no paged cache, e.g. DenseCausalAttention)

    def prepare(self, metadata: AttentionMetadata) -> None:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
        raise NotImplementedError


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim]; slot_mapping: [T] (-1 entries skipped)."""
    k_cache, v_cache = kv_cache
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


class TorchPagedAttention(AttentionBackend):
    """Reference backend: gathers K/V through the block table and calls SDPA."""

    def prepare(self, metadata: AttentionMetadata) -> None:
        """Sequences with one new token (decodes) are attended in one batched call, whatever else is in the
        step; prompt chunks and verify rows (several tokens) one sequence at a time."""
        self.meta = metadata
        self.block_tables = metadata.block_tables.long()
        self.decode_only = metadata.decode_only
        bs = metadata.block_size
        starts, self.multi = [], []
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(metadata.query_lens, metadata.seq_lens_host)):
            if q_len == 1:
                starts.append((i, start, seq_len))
            elif q_len > 1:
                self.multi.append((i, start, q_len, seq_len))
            start += q_len
        self.decode_rows = None
        if starts:
            device = metadata.seq_lens.device
            index = [i for i, _, _ in starts]
            lens = [n for _, _, n in starts]
            max_len = max(lens)
            rows = self.block_tables if self.decode_only else self.block_tables[torch.tensor(index, device=device)]
            self.decode_blocks = rows[:, :-(-max_len // bs)]
            self.decode_len = max_len
            self.decode_mask = None
            if any(n != max_len for n in lens):
                seq_lens = torch.tensor(lens, device=device)
                valid = torch.arange(max_len, device=device)[None, :] < seq_lens[:, None]
                self.decode_mask = valid[:, None, None, :]  # [B, 1, 1, L]
            if not self.decode_only:
                self.decode_rows = torch.tensor([s for _, s, _ in starts], device=device)
        self.has_decodes = bool(starts)
        self.masks = {}

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
        """cache[blocks] -> [..., length, kv_heads, head_dim]."""
        g = cache[blocks]
        return g.reshape(*g.shape[:-4], -1, *g.shape[-2:])[..., :length, :, :]

    def _decode(self, q, k_cache, v_cache, scale, gqa):
        keys = self._gather(k_cache, self.decode_blocks, self.decode_len).transpose(1, 2)
        vals = self._gather(v_cache, self.decode_blocks, self.decode_len).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys.to(q.dtype), vals.to(q.dtype),
                                             attn_mask=self.decode_mask, scale=scale, enable_gqa=gqa)
        return out.squeeze(2)

    def forward(self, q, k, v, kv_cache, scale):
        meta = self.meta
        write_kv(k, v, kv_cache, meta.slot_mapping)
        k_cache, v_cache = kv_cache
        gqa = q.shape[1] != k_cache.shape[2]
        if self.decode_only:
            return self._decode(q, k_cache, v_cache, scale, gqa)
        out = torch.empty_like(q)
        if self.has_decodes:
            out[self.decode_rows] = self._decode(q[self.decode_rows], k_cache, v_cache, scale, gqa)
        bs = meta.block_size
        for i, start, q_len, seq_len in self.multi:
            blocks = self.block_tables[i, : -(-seq_len // bs)]
            keys = self._gather(k_cache, blocks, seq_len).transpose(0, 1).unsqueeze(0)
            vals = self._gather(v_cache, blocks, seq_len).transpose(0, 1).unsqueeze(0)
            qi = q[start:start + q_len].transpose(0, 1).unsqueeze(0)
            mask = self._causal_mask(q_len, seq_len, q.device)
            oi = F.scaled_dot_product_attention(qi, keys.to(q.dtype), vals.to(q.dtype), attn_mask=mask,
                                                scale=scale, enable_gqa=gqa)
            out[start:start + q_len] = oi.squeeze(0).transpose(0, 1)
        return out

    def _causal_mask(self, q_len: int, seq_len: int, device) -> torch.Tensor | None:
        """Query i (absolute position seq_len - q_len + i) sees keys 0..its position."""
        if q_len == 1:
            return None
        key = (q_len, seq_len)
        if key not in self.masks:
            rows = torch.arange(q_len, device=device)[:, None] + (seq_len - q_len)
            self.masks[key] = rows >= torch.arange(seq_len, device=device)[None, :]
        return self.masks[key]


class DenseCausalAttention(AttentionBackend):
    """No cache: causal attention over one whole sequence (training and offline scoring)."""

    def prepare(self, metadata=None) -> None:
        pass

    def forward(self, q, k, v, kv_cache, scale):
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(0, 1)
