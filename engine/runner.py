"""Model runner: owns the KV tensors, turns a SchedulerOutput into model inputs, runs the main model,
verifies drafts / samples, and lets the MTP proposer draft for the next step."""

from __future__ import annotations

import time

import torch

from mtpserve.engine.kv_cache import KVCacheManager
from mtpserve.engine.sampler import Sampler, token_logprobs
from mtpserve.engine.scheduler import SchedulerOutput, StepResult
from mtpserve.engine.spec.proposer import DraftInput, MTPProposer
from mtpserve.engine.spec.rejection import verify
from mtpserve.kernels.attention import AttentionMetadata, TorchPagedAttention


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


class ModelRunner:
    def __init__(self, model, kv: KVCacheManager, num_blocks: int, dtype: torch.dtype, device: torch.device,
                 mtp=None, policy=None):
        cfg = model.config
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = kv.block_size
        shape = (num_blocks, kv.block_size, cfg.num_key_value_heads, cfg.head_dim)
        num_mtp = len(mtp.layers) if mtp is not None else 0
        self.kv_caches = [tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in "kv") if cfg.has_kv(i)
                          else None for i in range(cfg.num_hidden_layers + num_mtp)]
        self.attn = TorchPagedAttention()
        self.sampler = Sampler()
        self.vocab_size = cfg.vocab_size
        self.proposer = (MTPProposer(mtp, kv, self.kv_caches[cfg.num_hidden_layers:], cfg.vocab_size, device)
                         if mtp is not None else None)
        self.policy = policy  # DraftPolicy: drafts per request for the next step

    def prepare_inputs(self, out: SchedulerOutput):
        """Flattened input_ids/positions and the attention metadata for one step."""
        input_ids, positions, rows, query_lens, seq_lens = [], [], [], [], []
        tables = []
        for row, s in enumerate(out.scheduled):
            r, n, start = s.request, s.num_new_tokens, s.request.num_computed_tokens
            known = n - s.num_spec_tokens
            input_ids.extend(r.all_token_ids[start:start + known])
            input_ids.extend(r.spec_token_ids[:s.num_spec_tokens])
            positions.extend(range(start, start + n))
            rows.extend([row] * n)
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(self.kv.block_tables[r.request_id])
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        pos = torch.tensor(positions, dtype=torch.long)
        row_idx = torch.tensor(rows, dtype=torch.long)
        bs = self.block_size
        slot_mapping = block_tables[row_idx, pos // bs].long() * bs + pos % bs
        query_start_loc = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(dev), block_tables=block_tables.to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev), query_start_loc=query_start_loc.to(dev),
            query_lens=query_lens, seq_lens_host=seq_lens, block_size=bs, recurrent=self.kv.step_state(out.scheduled))
        return torch.tensor(input_ids, dtype=torch.long, device=dev), pos.to(dev), meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one step: verify/sample for every request that reached its end, then draft. The draft policy is
        fed here too: the acceptance of the drafts just verified, and the step's time."""
        start_time = time.perf_counter()
        input_ids, positions, meta = self.prepare_inputs(out)
        self.attn.prepare(meta)
        hidden = self.model(input_ids, positions, self.kv_caches, self.attn)
        starts = [0]
        for n in meta.query_lens:
            starts.append(starts[-1] + n)
        result = StepResult()
        sampling = [i for i, s in enumerate(out.scheduled) if s.samples]
        if sampling:
            self._sample(out, sampling, hidden, starts, result)
        if self.proposer is not None:
            self._draft(out, hidden, starts, result)
            self._observe_step(out, result, time.perf_counter() - start_time)
        return result

    def free(self, request_id: str) -> None:
        """Drop speculation state of a request that finished, was aborted or was preempted."""
        if self.proposer is not None:
            self.proposer.free(request_id)
        if self.policy is not None:
            self.policy.free(request_id)

    def _sample(self, out, sampling, hidden, starts, result: StepResult) -> None:
        scheduled = [out.scheduled[i] for i in sampling]
        reqs = [s.request for s in scheduled]
        rows = [r for i, s in zip(sampling, scheduled)
                for r in range(starts[i + 1] - s.num_spec_tokens - 1, starts[i + 1])]
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
        params = [r.sampling_params for r in reqs]
        prompts, outputs = [r.prompt_token_ids for r in reqs], [r.output_token_ids for r in reqs]
        noises = [r.noise for r in reqs]
        if not any(s.num_spec_tokens for s in scheduled):
            sampled = self.sampler(logits, params, prompts, outputs, noises)
            new = [[t] for t in sampled.token_ids.tolist()]
        else:
            drafts = [s.request.spec_token_ids[:s.num_spec_tokens] for s in scheduled]
            probs = [self._draft_probs(s) for s in scheduled]
            new = verify(logits, drafts, probs, params, prompts, outputs, noises)
        result.new_token_ids = {r.request_id: toks for r, toks in zip(reqs, new)}
        if self.policy is not None:
            for s, toks in zip(scheduled, new):
                self.policy.observe_acceptance(s.request.request_id, s.num_spec_tokens, len(toks) - 1)
        if any(p.logprobs is not None for p in params):
            self._logprobs(logits, scheduled, params, new, result)

    def _draft_probs(self, s) -> torch.Tensor | None:
        """q of the drafts ``s`` verifies (unseeded sampled requests only)."""
        if self.proposer is None or not s.num_spec_tokens:
            return None
        probs = self.proposer.draft_probs.get(s.request.request_id)
        return None if probs is None else probs[:s.num_spec_tokens]
    @staticmethod
    def _logprobs(logits, scheduled, params, new, result: StepResult) -> None:
        """Logprobs of each emitted token from its own target row (row j of a request's k + 1 rows)."""
        rows, row_tokens, row_params, owners, start = [], [], [], [], 0
        for s, p, toks in zip(scheduled, params, new):
            if p.logprobs is not None:
                rows.extend(range(start, start + len(toks)))
                row_tokens.extend(toks)
                row_params.extend([p] * len(toks))
                owners.extend([s.request.request_id] * len(toks))
            start += s.num_spec_tokens + 1
        index = torch.tensor(rows, device=logits.device)
        tokens = torch.tensor(row_tokens, device=logits.device)
        for owner, lp in zip(owners, token_logprobs(logits[index], tokens, row_params)):
            result.logprobs.setdefault(owner, []).append(lp)

    def _draft(self, out, hidden, starts, result: StepResult) -> None:
        items, drafting = [], []
        for i, s in enumerate(out.scheduled):
            req, start = s.request, s.request.num_computed_tokens
            if req.spec_n_max == 0:
                continue
            known = s.num_new_tokens - s.num_spec_tokens
            if s.samples:  # a request that finishes with these tokens drafts too; its drafts are dropped
                new = result.new_token_ids[req.request_id]
                next_tokens = req.all_token_ids[start + 1:start + known] + new
                history = req.output_token_ids + new
                drafting.append(len(items))
            else:  # a prompt chunk: fill the MTP KV only
                next_tokens = req.all_token_ids[start + 1:start + known + 1]
                history = []
            rows = hidden[starts[i]:starts[i] + len(next_tokens)]
            items.append(DraftInput(req, start, rows, next_tokens, history, 0))
        if drafting and self.policy is not None:
            plan = self.policy.plan([items[j].request for j in drafting], len(out.scheduled))
            for j, k in zip(drafting, plan):
                items[j].num_drafts = k
        result.spec_token_ids = self.proposer.propose(items)

    def _observe_step(self, out: SchedulerOutput, result: StepResult, seconds: float) -> None:
        """A pure decode step (no prompt chunk) prices speculation for the policy's fit."""
        if self.policy is None or any(s.num_new_tokens - s.num_spec_tokens != 1 for s in out.scheduled):
            return
        next_drafts = [len(d) for d in result.spec_token_ids.values()]
        self.policy.observe(len(out.scheduled), out.num_tokens, next_drafts, seconds)
