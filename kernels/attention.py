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
    # host copy of query_start_loc (None: walk query_lens)
    query_start_loc_host: list[int] | None = None

    def token_starts(self) -> list[int]:
        """[B + 1] where each sequence's tokens start in the flattened step."""
        if self.query_start_loc_host is not None:
            return self.query_start_loc_host
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        return starts


def build_metadata(tables: list[list[int]], starts: list[int], query_lens: list[int],
                   block_size: int, device,
                   recurrent=None) -> tuple[AttentionMetadata, torch.Tensor]:
    """The metadata of a step in which sequence i computes ``query_lens[i]`` new tokens from
    position ``starts[i]`` on, over its block table ``tables[i]``, and the [T] positions of those
    tokens. The one place the slot formula lives:
    slot = block_tables[seq, pos // block_size] * block_size + pos % block_size."""
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    positions, rows, token_starts, seq_lens = [], [], [0], []
    for i, (start, n) in enumerate(zip(starts, query_lens)):
        positions.extend(range(start, start + n))
        rows.extend([i] * n)
        token_starts.append(token_starts[-1] + n)
        seq_lens.append(start + n)
    pos = torch.tensor(positions, dtype=torch.long)
    row_index = torch.tensor(rows, dtype=torch.long)
    slot_mapping = block_tables[row_index, pos // block_size].long() * block_size
    slot_mapping += pos % block_size
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(device), block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(token_starts, dtype=torch.int32, device=device),
        query_lens=list(query_lens), seq_lens_host=seq_lens, block_size=block_size,
        recurrent=recurrent, query_start_loc_host=token_starts)
    return meta, pos.to(device)


class AttentionBackend:
    """Interface: ``prepare`` once per step, ``forward`` once per layer."""

    # the step's metadata (None: no paged cache, e.g. DenseCausalAttention)
    meta: AttentionMetadata | None = None
    # True: ``forward`` reads nothing on the host, so a CUDA graph can capture it
    capturable = False

    def prepare(self, metadata: AttentionMetadata) -> None:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
        raise NotImplementedError


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
             slot_mapping: torch.Tensor, has_skips: bool = True) -> None:
    """k, v: [T, kv_heads, head_dim]; slot_mapping: [T] (-1 entries skipped). ``has_skips=False``
    promises there is no -1 (known once per step), sparing each layer a device-to-host read."""
    k_cache, v_cache = kv_cache
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    if has_skips and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


# sequences with at most this many new tokens are attended together in one batched call
SHORT_QUERY = 16


class TorchPagedAttention(AttentionBackend):
    """Reference backend: gathers K/V through the block table and calls SDPA."""

    def prepare(self, metadata: AttentionMetadata) -> None:
        """Keep the step's metadata; its plan is made at the first layer's ``forward`` (a step
        that runs as one kernel call, kernels/cpu_decoder.py, never needs one)."""
        self.meta = metadata
        self.planned = False

    def _plan(self) -> None:
        """Sequences with few new tokens (decodes, verify rows) are attended in one batched call,
        their queries padded to the longest; prompt chunks one sequence at a time."""
        metadata = self.meta
        self.planned = True
        self.has_skips = bool((metadata.slot_mapping < 0).any())
        self.block_tables = metadata.block_tables.long()
        short, self.long = [], []
        starts = metadata.token_starts()
        for i, (q_len, seq_len) in enumerate(zip(metadata.query_lens, metadata.seq_lens_host)):
            if q_len <= 0:
                continue
            if q_len <= SHORT_QUERY:
                short.append((i, starts[i], q_len, seq_len))
            else:
                self.long.append((i, starts[i], q_len, seq_len))
        self.short = bool(short)
        if short:
            self._plan_short(short, metadata, all_short=len(short) == len(metadata.query_lens))
        self.masks = {}

    def _plan_short(self, short, metadata: AttentionMetadata, all_short: bool) -> None:
        device, bs = metadata.seq_lens.device, metadata.block_size
        q_lens = [q for _, _, q, _ in short]
        seq_lens = [n for _, _, _, n in short]
        max_q, max_len = max(q_lens), max(seq_lens)
        sequences = [i for i, *_ in short]
        if all_short:
            rows = self.block_tables
        else:
            rows = self.block_tables[torch.tensor(sequences, device=device)]
        self.short_blocks = rows[:, :-(-max_len // bs)]
        self.short_len = max_len
        self.whole_step = all_short and max_q == 1  # q is already [G, ...]: no gather, no scatter
        self.short_index = self.short_valid = None
        if not self.whole_step:
            # query j of a sequence padded to max_q by repeating its last query
            # (its output is dropped)
            index, rows = [], []
            for _, start, q, _ in short:
                index.extend(start + min(j, q - 1) for j in range(max_q))
                rows.extend(range(start, start + q))
            self.short_index = torch.tensor(index, device=device).view(len(short), max_q)
            q_len_col = torch.tensor(q_lens)[:, None]
            self.short_valid = (torch.arange(max_q)[None, :] < q_len_col).to(device)
            self.short_rows = torch.tensor(rows, device=device)
        self.short_mask = None
        if max_q > 1 or any(n != max_len for n in seq_lens):
            # query j of a sequence sees keys up to position seq_len - q_len + j
            last_rows = []
            for q, n in zip(q_lens, seq_lens):
                last_rows.append([n - q + min(j, q - 1) for j in range(max_q)])
            last = torch.tensor(last_rows, device=device)
            key_pos = torch.arange(max_len, device=device)[None, None, :]
            self.short_mask = (key_pos <= last[:, :, None]).unsqueeze(1)

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
        """cache[blocks] -> [..., length, kv_heads, head_dim]."""
        g = cache[blocks]
        return g.reshape(*g.shape[:-4], -1, *g.shape[-2:])[..., :length, :, :]

    def _attend_short(self, q, k_cache, v_cache, scale, gqa):
        """[G, max_q, heads, head_dim] outputs of the short sequences."""
        queries = q.unsqueeze(1) if self.whole_step else q[self.short_index]
        keys = self._gather(k_cache, self.short_blocks, self.short_len).transpose(1, 2)
        vals = self._gather(v_cache, self.short_blocks, self.short_len).transpose(1, 2)
        out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.to(q.dtype),
                                             vals.to(q.dtype), attn_mask=self.short_mask,
                                             scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)

    def forward(self, q, k, v, kv_cache, scale):
        if not self.planned:
            self._plan()
        meta = self.meta
        write_kv(k, v, kv_cache, meta.slot_mapping, self.has_skips)
        k_cache, v_cache = kv_cache
        gqa = q.shape[1] != k_cache.shape[2]
        if self.short and self.whole_step:
            return self._attend_short(q, k_cache, v_cache, scale, gqa).squeeze(1)
        out = q.new_empty(*q.shape[:2], v_cache.shape[-1])
        if self.short:
            short_out = self._attend_short(q, k_cache, v_cache, scale, gqa)
            out[self.short_rows] = short_out[self.short_valid]
        bs = meta.block_size
        for i, start, q_len, seq_len in self.long:
            blocks = self.block_tables[i, : -(-seq_len // bs)]
            keys = self._gather(k_cache, blocks, seq_len).transpose(0, 1).unsqueeze(0)
            vals = self._gather(v_cache, blocks, seq_len).transpose(0, 1).unsqueeze(0)
            qi = q[start:start + q_len].transpose(0, 1).unsqueeze(0)
            mask = self._causal_mask(q_len, seq_len, q.device)
            oi = F.scaled_dot_product_attention(qi, keys.to(q.dtype), vals.to(q.dtype),
                                                attn_mask=mask, scale=scale, enable_gqa=gqa)
            out[start:start + q_len] = oi.squeeze(0).transpose(0, 1)
        return out

    def _causal_mask(self, q_len: int, seq_len: int, device) -> torch.Tensor:
        """Query i (absolute position seq_len - q_len + i) sees keys 0..its position."""
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
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), is_causal=True, scale=scale,
                                             enable_gqa=gqa)
        return out.transpose(0, 1)
