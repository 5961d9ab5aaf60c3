"""Measure what a verify step and a draft step cost, for the adaptive draft policy.

A verify step is timed whole, as the engine runs it: b requests of q new tokens each (the last
verified token and q - 1 drafts) through the main model, their logits, and greedy verification
(plain sampling when q = 1). Runs at engine start on blocks that are still free (what it writes
there is overwritten before any request reads it) and takes the fastest of a few repeats per shape.
"""

from __future__ import annotations

import time

import torch

from mtpserve.engine.sampler import Sampler
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.spec.policy import StepCosts
from mtpserve.engine.spec.rejection import verify
from mtpserve.kernels.attention import AttentionMetadata

REPEATS = 3
CONTEXT = 128  # tokens of context each measured sequence attends to


def _metadata(runner, rows: int, query_len: int, device) -> tuple[AttentionMetadata, torch.Tensor]:
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


def _fits(runner, rows: int, query_len: int) -> bool:
    return rows * (CONTEXT + query_len + runner.block_size) <= runner.kv.pool.num_blocks * runner.block_size


@torch.inference_mode()
def measure_step_costs(runner, max_batch: int, max_tokens: int, n_max: int) -> StepCosts:
    """Verify steps of up to ``max_batch`` requests and ``max_tokens`` tokens, with 0, 1 and ``n_max`` drafts
    each; draft steps of up to ``max_batch`` requests."""
    model, proposer, device = runner.model, runner.proposer, runner.device
    costs = StepCosts(main={}, draft={})
    greedy = SamplingParams(temperature=0)
    sampler = Sampler()
    query_lens = sorted({1, 2, n_max + 1})
    b = 1
    while b <= max_batch and _fits(runner, b, 1):
        params, prompts, outputs, gens = [greedy] * b, [[0]] * b, [[]] * b, [None] * b
        for q in query_lens:
            if (b * q > max_tokens and q > 1) or not _fits(runner, b, q):
                continue
            meta, pos = _metadata(runner, b, q, device)
            ids = torch.zeros(b * q, dtype=torch.long, device=device)
            drafts = [[0] * (q - 1)] * b

            def verify_step():
                runner.attn.prepare(meta)
                logits = model.compute_logits(model(ids, pos, runner.kv_caches, runner.attn))
                if q == 1:
                    sampler(logits, params, prompts, outputs, gens)
                else:
                    verify(logits, drafts, [None] * b, params, prompts, outputs, gens)

            costs.main[b, q] = _best_time(verify_step)
        meta, pos = _metadata(runner, b, 1, device)
        ids = torch.zeros(b, dtype=torch.long, device=device)
        hidden = torch.zeros(b, model.config.hidden_size, device=device, dtype=model.lm_head.dtype)

        def draft_step():
            proposer.attn.prepare(meta)
            proposer.mtp.compute_logits(1, proposer.mtp(1, ids, hidden, pos + 1, proposer.kv_caches, proposer.attn))

        costs.draft[b] = _best_time(draft_step)
        b *= 2
    return costs
