"""Measure what a main-model step and a draft step cost, for the adaptive draft policy.

Runs at engine start on blocks that are still free (what it writes there is overwritten before any
request reads it) and takes the fastest of a few repeats per size.
"""

from __future__ import annotations

import time

import torch

from mtpserve.engine.spec.policy import StepCosts
from mtpserve.kernels.attention import AttentionMetadata

REPEATS = 3
CONTEXT = 64  # tokens of context each measured sequence attends to


def _metadata(runner, rows: int, query_len: int, device) -> AttentionMetadata:
    bs = runner.block_size
    seq_len = CONTEXT + query_len
    blocks_per_seq = -(-seq_len // bs)
    tables = torch.arange(rows * blocks_per_seq, dtype=torch.int32).view(rows, blocks_per_seq)
    pos = torch.arange(CONTEXT, seq_len).repeat(rows)
    row = torch.arange(rows).repeat_interleave(query_len)
    slots = tables[row, pos // bs].long() * bs + pos % bs
    return AttentionMetadata(
        slot_mapping=slots.to(device), block_tables=tables.to(device),
        seq_lens=torch.full((rows,), seq_len, dtype=torch.int32, device=device),
        query_start_loc=(torch.arange(rows + 1, dtype=torch.int32) * query_len).to(device),
        query_lens=[query_len] * rows, seq_lens_host=[seq_len] * rows, block_size=bs), pos.to(device)


def _best_time(fn) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def measure_step_costs(runner, max_tokens: int) -> StepCosts:
    model, proposer, device = runner.model, runner.proposer, runner.device
    costs = StepCosts(main={}, draft={})
    capacity = runner.kv.pool.num_blocks * runner.block_size
    n = 1
    while n <= max_tokens and n * (CONTEXT + runner.block_size) <= capacity:
        meta, pos = _metadata(runner, n, 1, device)  # n sequences decoding one token each
        ids = torch.zeros(n, dtype=torch.long, device=device)

        def main_step():
            runner.attn.prepare(meta)
            h = model(ids, pos, runner.kv_caches, runner.attn)
            model.compute_logits(h)

        def draft_step():
            proposer.attn.prepare(meta)
            y = proposer.mtp(1, ids, torch.zeros(n, model.config.hidden_size, device=device,
                                                 dtype=model.lm_head.dtype), pos + 1,
                             proposer.kv_caches, proposer.attn)
            proposer.mtp.compute_logits(1, y)

        costs.main[n] = _best_time(main_step)
        costs.draft[n] = _best_time(draft_step)
        n *= 2
    return costs
