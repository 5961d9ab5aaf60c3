"""CUDA graphs for the steps that repeat: the main model's forward over a batch in which every
request computes the same number of tokens ``q`` (a decode: q = 1; a verify of k drafts: q = k + 1),
and an MTP layer's one-token draft step.

A small model on a GPU is bound by kernel launches: each of a step's few hundred kernels waits on
Python to launch it. A graph per bucket (batch size, q) is captured once at start-up on static input
buffers, and each step copies its inputs into the buffers and replays the graph: one launch for the
whole forward. Batches are padded up to the next captured batch size. A padded request computes
``q`` tokens over block 0 and writes nowhere (slot -1); its rows are dropped. Steps outside the
buckets (prompt chunks, mixed query lengths, more requests than the largest bucket) run eagerly.

The attention backend must read all it needs from the metadata's device tensors (the Triton
backend does); the model must not read device values on the host (dense models do not; the MoE
routing and the recurrent state of hybrid models do, so those run eagerly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mtpserve.kernels.attention import AttentionMetadata

logger = logging.getLogger(__name__)

# captured batch sizes, up to the engine's max_num_seqs
BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The captured batch sizes: the standard ones below ``max_num_seqs``, and it."""
    sizes = []
    for size in BATCH_SIZES:
        if size < max_num_seqs:
            sizes.append(size)
    sizes.append(min(max_num_seqs, BATCH_SIZES[-1]))
    return sizes


def uniform_query_len(meta: AttentionMetadata) -> int | None:
    """q when every sequence of the step computes q tokens, else None."""
    lens = meta.query_lens
    if not lens or meta.recurrent is not None:
        return None
    q = lens[0]
    for n in lens:
        if n != q:
            return None
    return q


@dataclass
class StaticInputs:
    """The buffers a graph reads, sized for the largest bucket."""

    input_ids: torch.Tensor  # [max_B * max_q] int64
    positions: torch.Tensor  # [max_B * max_q] int64
    slot_mapping: torch.Tensor  # [max_B * max_q] int64
    block_tables: torch.Tensor  # [max_B, max_blocks] int32
    seq_lens: torch.Tensor  # [max_B] int32

    @classmethod
    def allocate(cls, max_batch: int, max_q: int, max_blocks: int, device) -> StaticInputs:
        tokens = max_batch * max_q
        return cls(
            input_ids=torch.zeros(tokens, dtype=torch.long, device=device),
            positions=torch.zeros(tokens, dtype=torch.long, device=device),
            slot_mapping=torch.full((tokens,), -1, dtype=torch.long, device=device),
            block_tables=torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device),
            seq_lens=torch.ones(max_batch, dtype=torch.int32, device=device))

    def metadata(self, batch_size: int, q: int, block_size: int) -> AttentionMetadata:
        """The metadata of a bucket: views of the buffers, and its own query_start_loc (fixed:
        every sequence computes q tokens)."""
        tokens = batch_size * q
        starts = list(range(0, tokens + 1, q))
        device = self.input_ids.device
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens], block_tables=self.block_tables[:batch_size],
            seq_lens=self.seq_lens[:batch_size],
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            query_lens=[q] * batch_size, seq_lens_host=[q] * batch_size, block_size=block_size,
            query_start_loc_host=starts)

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
             batch_size: int, q: int) -> None:
        """Copy a step's inputs in; the padded requests (up to ``batch_size``) write nowhere and
        attend over their first q keys."""
        num_seqs = len(meta.query_lens)
        tokens = num_seqs * q
        padded = batch_size * q
        width = meta.block_tables.shape[1]
        self.input_ids[:tokens].copy_(input_ids)
        self.positions[:tokens].copy_(positions)
        self.slot_mapping[:tokens].copy_(meta.slot_mapping)
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens)
        if padded > tokens:
            self.input_ids[tokens:padded].zero_()
            self.positions[tokens:padded].zero_()
            self.slot_mapping[tokens:padded].fill_(-1)
            self.seq_lens[num_seqs:batch_size].fill_(q)


class CUDAGraphs:
    """Captured calls of ``forward(input_ids, positions, hidden, attn) -> [T, H]`` per
    (batch size, q) bucket, and their replay. ``hidden_in`` (width, dtype): ``hidden`` is a
    static input of that many columns (an MTP layer's), or None (the main model's forward)."""

    def __init__(self, forward, attn, block_size: int, max_num_seqs: int, query_lens: list[int],
                 max_blocks: int, device, hidden_in: tuple[int, torch.dtype] | None = None):
        self.forward = forward
        self.attn = attn
        self.block_size = block_size
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.query_lens = query_lens
        self.max_blocks = max_blocks
        max_batch = self.batch_sizes[-1]
        max_q = max(query_lens)
        self.inputs = StaticInputs.allocate(max_batch, max_q, max_blocks, device)
        self.hidden = None
        if hidden_in is not None:
            width, dtype = hidden_in
            self.hidden = torch.zeros(max_batch * max_q, width, dtype=dtype, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest captured batch size that holds ``num_seqs`` requests."""
        for size in self.batch_sizes:
            if size >= num_seqs:
                return size
        return None

    def can_run(self, meta: AttentionMetadata) -> bool:
        q = uniform_query_len(meta)
        if q not in self.query_lens:
            return False
        if meta.block_tables.shape[1] > self.max_blocks:
            return False
        return self.bucket(len(meta.query_lens)) is not None

    @torch.inference_mode()
    def capture(self, name: str, pool) -> None:
        """Capture every bucket, the largest first (``pool``: the memory pool all graphs share),
        with progress."""
        buckets = []
        for q in self.query_lens:
            for size in reversed(self.batch_sizes):
                buckets.append((size, q))
        for i, (size, q) in enumerate(buckets):
            self.graphs[(size, q)] = self._capture_one(size, q, pool)
            logger.info("CUDA graphs (%s): captured %d/%d (batch %d, %d token(s) each)",
                        name, i + 1, len(buckets), size, q)
        torch.cuda.synchronize()

    def _capture_one(self, size: int, q: int, pool):
        tokens = size * q
        meta = self.inputs.metadata(size, q, self.block_size)
        ids = self.inputs.input_ids[:tokens]
        positions = self.inputs.positions[:tokens]
        hidden = None
        if self.hidden is not None:
            hidden = self.hidden[:tokens]
        self.attn.prepare(meta)
        self.forward(ids, positions, hidden, self.attn)  # warm-up: kernels compile outside
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.forward(ids, positions, hidden, self.attn)
        return graph, out

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The [T, H] output of the step (a copy: the graph's buffer is reused next step)."""
        q = uniform_query_len(meta)
        num_seqs = len(meta.query_lens)
        size = self.bucket(num_seqs)
        self.inputs.fill(input_ids, positions, meta, size, q)
        if hidden is not None:
            self.hidden[:hidden.shape[0]].copy_(hidden)
        graph, out = self.graphs[(size, q)]
        graph.replay()
        self.num_replays += 1
        return out[:num_seqs * q].clone()
