"""Model runner: owns the KV tensors, turns a SchedulerOutput into model inputs, runs the main
model, verifies drafts / samples, and lets the MTP proposer draft for the next step."""

from __future__ import annotations

import logging
import time

import torch

from mtpserve.engine.attention_backend import make_attention_backend
from mtpserve.engine.cuda_graph import CUDAGraphs
from mtpserve.engine.kv_cache import KVCacheManager
from mtpserve.engine.sampler import SamplingBatch, token_logprobs
from mtpserve.engine.scheduler import SchedulerOutput, StepResult
from mtpserve.engine.spec.proposer import DraftInput, MTPProposer
from mtpserve.engine.spec.rejection import verify
from mtpserve.engine.step_batch import StepBatch

logger = logging.getLogger(__name__)


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


class ModelRunner:
    def __init__(self, model, kv: KVCacheManager, num_blocks: int, dtype: torch.dtype,
                 device: torch.device, mtp=None, policy=None, attention: str = "torch"):
        """``attention``: the resolved attention backend, "torch" or "triton"."""
        cfg = model.config
        self.model = model
        self.kv = kv
        self.dtype = dtype
        self.device = device
        self.block_size = kv.block_size
        shape = (num_blocks, kv.block_size, cfg.num_key_value_heads, cfg.head_dim)
        num_mtp = len(mtp.layers) if mtp is not None else 0
        self.kv_caches = [tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in "kv")
                          if cfg.has_kv(i) else None
                          for i in range(cfg.num_hidden_layers + num_mtp)]
        self.attn = make_attention_backend(attention)
        self.vocab_size = cfg.vocab_size
        mtp_caches = self.kv_caches[cfg.num_hidden_layers:]
        self.proposer = None
        if mtp is not None:  # the draft steps attend through a backend of the same kind
            self.proposer = MTPProposer(mtp, kv, mtp_caches, cfg.vocab_size, device,
                                        make_attention_backend(attention))
        self.policy = policy  # DraftPolicy: drafts per request for the next step
        self.fused_drafts = False  # the last step's drafts ran in one kernel call
        self.graphs: CUDAGraphs | None = None  # captured forwards (capture_graphs)
        self.num_graphs = 0
        self.capture_seconds = 0.0

    def prepare(self, out: SchedulerOutput) -> StepBatch:
        return StepBatch.build(out, self.kv, self.vocab_size, self.device, self._draft_probs)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one step: verify/sample for every request that reached its end, then draft. The
        draft policy is fed here too: the acceptance of the drafts just verified, and the
        step's time."""
        start_time = time.perf_counter()
        batch = self.prepare(out)
        hidden = self._forward(batch)
        result = StepResult()
        if batch.sampling:
            self._sample(batch, hidden, result)
        if self.proposer is not None:
            self._draft(batch, hidden, result)
            self._observe_step(out, result, time.perf_counter() - start_time)
        return result

    def capture_graphs(self, max_num_seqs: int, max_q: int, max_blocks: int) -> None:
        """Capture the main model's decode and verify forwards, and the MTP layers' one-token
        draft steps, in CUDA graphs (cuda_graph.py)."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        query_lens = list(range(1, max_q + 1))
        self.graphs = CUDAGraphs(self._model_forward, self.attn, self.block_size, max_num_seqs,
                                 query_lens, max_blocks, self.device)
        self.graphs.capture("main model", pool)
        if self.proposer is not None and max_q > 1:
            self.proposer.capture_graphs(max_num_seqs, max_blocks, self.dtype, pool)
        self.num_graphs = len(self.graphs.graphs)
        if self.proposer is not None:
            for graphs in self.proposer.graphs:
                self.num_graphs += len(graphs.graphs)
        self.capture_seconds = time.perf_counter() - start
        logger.info("CUDA graphs: %d captured in %.1f s", self.num_graphs, self.capture_seconds)

    def _model_forward(self, input_ids, positions, hidden, attn) -> torch.Tensor:
        return self.model(input_ids, positions, self.kv_caches, attn)

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        """The main model's [T, hidden] output: a graph's replay when one fits the step."""
        meta = batch.attn
        if self.graphs is not None and self.graphs.can_run(meta):
            return self.graphs.run(batch.input_ids, batch.positions, meta)
        self.attn.prepare(meta)
        return self.model(batch.input_ids, batch.positions, self.kv_caches, self.attn)

    def free(self, request_id: str) -> None:
        """Drop speculation state of a request that finished, was aborted or was preempted."""
        if self.proposer is not None:
            self.proposer.free(request_id)
        if self.policy is not None:
            self.policy.free(request_id)

    def _sample(self, batch: StepBatch, hidden: torch.Tensor, result: StepResult) -> None:
        sampling = batch.sampling_batch
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        new = verify(logits, sampling)
        scheduled = [batch.scheduled[i] for i in batch.sampling]
        for s, tokens in zip(scheduled, new):
            result.new_token_ids[s.request.request_id] = tokens
            if self.policy is not None:
                self.policy.observe_acceptance(s.request.request_id, s.num_spec_tokens,
                                               len(tokens) - 1)
        if any(p.logprobs is not None for p in sampling.params):
            self._logprobs(logits, scheduled, sampling, new, result)

    def _draft_probs(self, s) -> torch.Tensor | None:
        """q of the drafts ``s`` verifies (unseeded sampled requests only)."""
        if self.proposer is None or not s.num_spec_tokens:
            return None
        probs = self.proposer.draft_probs.get(s.request.request_id)
        if probs is None:
            return None
        return probs[:s.num_spec_tokens]

    @staticmethod
    def _logprobs(logits, scheduled, sampling: SamplingBatch, new, result: StepResult) -> None:
        """Logprobs of each emitted token from its own target row (row j of a
        request's k + 1 rows)."""
        rows, row_tokens, row_params, owners = [], [], [], []
        for i, (s, p, tokens) in enumerate(zip(scheduled, sampling.params, new)):
            if p.logprobs is None:
                continue
            start = sampling.start_loc[i]
            rows.extend(range(start, start + len(tokens)))
            row_tokens.extend(tokens)
            row_params.extend([p] * len(tokens))
            owners.extend([s.request.request_id] * len(tokens))
        index = torch.tensor(rows, device=logits.device)
        tokens = torch.tensor(row_tokens, device=logits.device)
        for owner, lp in zip(owners, token_logprobs(logits[index], tokens, row_params)):
            result.logprobs.setdefault(owner, []).append(lp)

    def _draft(self, batch: StepBatch, hidden: torch.Tensor, result: StepResult) -> None:
        items, drafting = [], []
        starts = batch.token_starts
        for i, s in enumerate(batch.scheduled):
            req, start = s.request, s.request.num_computed_tokens
            if req.spec_n_max == 0:
                continue
            known = s.num_new_tokens - s.num_spec_tokens
            # a request that finishes with these tokens drafts too; its drafts are dropped
            if s.samples:
                new = result.new_token_ids[req.request_id]
                next_tokens = req.all_token_ids[start + 1:start + known] + new
                history = req.output_token_ids + new
                drafting.append(len(items))
            else:  # a prompt chunk: fill the MTP KV only
                next_tokens = req.all_token_ids[start + 1:start + known + 1]
                history = []
            rows = hidden[starts[i]:starts[i] + len(next_tokens)]
            items.append(DraftInput(req, start, rows, next_tokens, history, 0))
        requests = [items[j].request for j in drafting]
        self.fused_drafts = self.proposer.one_call_drafter(requests) is not None
        if drafting and self.policy is not None:
            plan = self.policy.plan(requests, len(batch.scheduled), self.fused_drafts)
            for j, k in zip(drafting, plan):
                items[j].num_drafts = k
        p_min = 0.0
        if self.policy is not None:
            p_min = self.policy.p_min
        result.spec_token_ids = self.proposer.propose(items, p_min)
        if self.policy is None:
            return
        for j in drafting:
            request_id = items[j].request.request_id
            if items[j].num_drafts and not result.spec_token_ids.get(request_id):
                self.policy.observe_cut(request_id)

    def _observe_step(self, out: SchedulerOutput, result: StepResult, seconds: float) -> None:
        """A pure decode step (no prompt chunk) prices speculation for the policy's fit."""
        if self.policy is None:
            return
        if any(s.num_new_tokens - s.num_spec_tokens != 1 for s in out.scheduled):
            return
        next_drafts = [len(d) for d in result.spec_token_ids.values()]
        self.policy.observe(len(out.scheduled), out.num_tokens, next_drafts, seconds,
                            self.fused_drafts)
