"""Measure what a verify step and a draft step cost, for the adaptive draft policy.

A verify step is timed whole, as the engine runs it: b requests of q new tokens each (the last
verified token and q - 1 drafts) through the main model, their logits, and greedy verification
(plain sampling when q = 1). A draft step is the MTP layer and its logits over the draft
vocabulary, as every draft path computes them (only drafts under penalties or a grammar widen them
to the whole vocabulary); where drafts run in one kernel call, that loop's first step and a later one
(greedy) are timed too. Runs at engine start on blocks that are still free (what it writes
there is overwritten before any request reads it) and takes the fastest of a few repeats per shape.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from mtpserve.engine.noise import RequestNoise
from mtpserve.engine.sampler import SamplingBatch
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.spec.policy import StepCosts
from mtpserve.engine.spec.rejection import verify
from mtpserve.kernels.attention import AttentionMetadata, build_metadata

REPEATS = 3
CONTEXT = 128  # tokens of context each measured sequence attends to


def _metadata(runner, rows: int, query_len: int, device) -> tuple[AttentionMetadata, torch.Tensor]:
    """``rows`` sequences of CONTEXT cached tokens and ``query_len`` new ones, on
    consecutive blocks."""
    bs = runner.block_size
    blocks_per_seq = -(-(CONTEXT + query_len) // bs)
    tables = [list(range(r * blocks_per_seq, (r + 1) * blocks_per_seq)) for r in range(rows)]
    return build_metadata(tables, [CONTEXT] * rows, [query_len] * rows, bs, device)


def best_time(fn, device: torch.device) -> float:
    """The fastest of REPEATS timed calls of ``fn`` (after one untimed call); on CUDA the clock
    waits for the device, so a step's kernels are counted, not only their launches."""
    fn()
    times = []
    for _ in range(REPEATS):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fits(runner, rows: int, query_len: int) -> bool:
    capacity = runner.kv.pool.num_blocks * runner.block_size
    return rows * (CONTEXT + query_len + runner.block_size) <= capacity


@torch.inference_mode()
def measure_step_costs(runner, max_batch: int, max_tokens: int, n_max: int) -> StepCosts:
    """Verify steps of up to ``max_batch`` requests and ``max_tokens`` tokens, with 0, 1, 2 and
    ``n_max`` drafts each; draft steps of up to ``max_batch`` requests."""
    model, proposer, device = runner.model, runner.proposer, runner.device
    costs = StepCosts(main={}, draft={})
    greedy = SamplingParams(temperature=0)
    query_lens = sorted({q for q in (1, 2, 3, n_max + 1) if q <= n_max + 1})
    b = 1
    while b <= max_batch and _fits(runner, b, 1):
        for q in query_lens:
            if (b * q > max_tokens and q > 1) or not _fits(runner, b, q):
                continue
            meta, pos = _metadata(runner, b, q, device)
            ids = torch.zeros(b * q, dtype=torch.long, device=device)
            batch = SamplingBatch.build([greedy] * b, [[0]] * b, [[]] * b, [RequestNoise(0)] * b,
                                        model.config.vocab_size, device,
                                        draft_token_ids=[[0] * (q - 1)] * b)

            def verify_step():
                runner.attn.prepare(meta)
                verify(model.compute_logits(model(ids, pos, runner.kv_caches, runner.attn)), batch)

            costs.main[b, q] = best_time(verify_step, device)
        meta, pos = _metadata(runner, b, 1, device)
        ids = torch.zeros(b, dtype=torch.long, device=device)
        hidden = torch.zeros(b, model.config.hidden_size, device=device, dtype=model.norm.dtype)

        def draft_step():
            proposer.attn.prepare(meta)
            y = proposer.mtp(1, ids, hidden, pos + 1, proposer.kv_caches, proposer.attn)
            proposer.mtp.draft_logits(1, y)

        costs.draft[b] = best_time(draft_step, device)
        drafter = proposer.drafter
        if drafter is not None and _fits(runner, b, n_max + 1):
            first, later = _fused_steps(runner, drafter, b, n_max, hidden.float())
            costs.fused_first[b] = first
            costs.fused[b] = later
        b *= 2
    return costs


def _fused_steps(runner, drafter, rows: int, n_max: int,
                 hidden: torch.Tensor) -> tuple[float, float]:
    """Draft steps of the one-call loop over ``rows`` greedy requests of one new token each: the
    first (the MTP pass over that token and the head), and a later one (the loop with ``n_max``
    drafts less the loop with one, per step)."""
    width = max(n_max, 2)
    meta, _ = _metadata(runner, rows, width + 1, runner.device)
    tables = meta.block_tables.tolist()
    bs = runner.block_size

    def loop(num_drafts: int):
        drafter.propose(hidden, [0] * rows, [CONTEXT] * rows, [1] * rows, [num_drafts] * rows,
                        tables, bs)

    more = best_time(partial(loop, width), runner.device)
    one = best_time(partial(loop, 1), runner.device)
    return one, max(more - one, 0.0) / (width - 1)
