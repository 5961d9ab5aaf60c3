"""Continuous batching in tokens.

Every request has ``num_tokens`` (prompt + output) and ``num_computed_tokens`` (already in the KV
cache). Each step the scheduler hands out a token budget: running requests first (decode, or the
next chunk of a long prompt), then waiting ones. A waiting request starts after the longest prefix of
its blocks found in the prefix cache (``kv_cache.py``). When the cache runs out, the most recently
admitted running request is preempted: its blocks are freed and it is recomputed later, from
whatever of its blocks the prefix cache still holds.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from mtpserve.engine.kv_cache import KVCacheManager
from mtpserve.engine.request import Request, RequestStatus, check_stop


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # includes the draft tokens being verified
    num_spec_tokens: int = 0  # draft tokens (the last ones of this step) to verify

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's tokens, so new tokens are sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens - self.num_spec_tokens == r.num_tokens


@dataclass
class StepResult:
    """What the runner produced: per request the new tokens (accepted drafts + one sampled token)
    and the drafts for its next step."""

    new_token_ids: dict[str, list[int]] = field(default_factory=dict)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # per new token (logprob, top-n), when asked
    logprobs: dict[str, list] = field(default_factory=dict)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            known = req.num_tokens - req.num_computed_tokens
            # drafts ride along a decode step, within the budget and the context
            k = (min(len(req.spec_token_ids), budget - 1, self.max_model_len - req.num_tokens,
                     req.sampling_params.max_tokens - len(req.output_token_ids) - 1)
                 if known == 1 else 0)
            n = min(known + k, budget)
            while not self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n, k))
                budget -= n
                i += 1
        i = 0
        while (i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs
               and not out.preempted):
            req = self.waiting[i]
            cached = self.kv.cached_prefix(req)
            if self.kv.waits_for_prefix(req, len(cached)):
                i += 1  # another request is computing its next block; admit it after that
                continue
            num_cached = len(cached) * self.kv.block_size
            n = min(req.num_tokens - num_cached, budget)
            if not self.kv.admit(req, cached, num_cached + n):
                break
            del self.waiting[i]
            self._start(req, num_cached)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    def _start(self, req: Request, num_cached: int) -> None:
        """A waiting request is admitted with its first ``num_cached`` tokens found in the
        prefix cache."""
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = num_cached
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.perf_counter()
            req.num_cached_tokens = num_cached
        self.running.append(req)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, out: SchedulerOutput, result: StepResult) -> list[Request]:
        """Advance progress (rejected drafts are not computed), append new tokens, store the next
        drafts, finish requests. Returns the finished ones."""
        finished = []
        for s in out.scheduled:
            req = s.request
            new = result.new_token_ids.get(req.request_id, [])
            rejected = s.num_spec_tokens - (len(new) - 1) if new else s.num_spec_tokens
            req.num_computed_tokens += s.num_new_tokens - rejected
            if new:
                req.spec_stats.observe(s.num_spec_tokens, len(new) - 1)
            req.spec_token_ids = result.spec_token_ids.get(req.request_id, [])
            logprobs = result.logprobs.get(req.request_id)
            for i, token in enumerate(new):
                req.append_output(token)
                if logprobs is not None:
                    req.output_logprobs.append(logprobs[i])
                status = check_stop(req, self.max_model_len)
                if status is not None:
                    self.finish(req, status)
                    finished.append(req)
                    break
            if not req.status.finished:
                self.kv.cache_blocks(req)
                # release lookahead blocks beyond the next step's needs
                self.kv.trim(req.request_id, req.num_tokens + len(req.spec_token_ids))
        return finished

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Finish (or abort) a request wherever it is and free its blocks."""
        if req.status.finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if status != RequestStatus.FINISHED_ERROR:  # a failed step's KV is not trusted
            self.kv.cache_blocks(req)
        req.status = status
        req.finish_time = time.perf_counter()
        self.kv.free(req.request_id)
