"""One step's inputs, built once from the scheduler's output. The model, verification, logprobs and
the MTP proposer read their offsets from it instead of walking the batch again, and its tensors are
what a captured CUDA graph would keep as static buffers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtpserve.engine.kv_cache import KVCacheManager
from mtpserve.engine.sampler import SamplingBatch
from mtpserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from mtpserve.kernels.attention import AttentionMetadata, build_metadata


@dataclass
class StepBatch:
    scheduled: list[ScheduledRequest]  # [B]
    # [T] int64, request i's tokens at token_starts[i]:token_starts[i + 1]
    input_ids: torch.Tensor
    positions: torch.Tensor            # [T] int64
    # paged-attention metadata (and the recurrent-state view, hybrid models)
    attn: AttentionMetadata
    # [S] indices into scheduled of the requests that sample this step
    sampling: list[int]
    # [L] rows of the hidden states whose logits are computed: k_i + 1 each
    logits_indices: torch.Tensor
    sampling_batch: SamplingBatch | None  # the S requests' settings, drafts and logits rows

    @property
    def token_starts(self) -> list[int]:
        """[B + 1] where each request's tokens start in the flattened step (host)."""
        return self.attn.query_start_loc_host

    @classmethod
    def build(cls, out: SchedulerOutput, kv: KVCacheManager, vocab_size: int, device,
              draft_probs_of) -> StepBatch:
        """``draft_probs_of(scheduled)``: the q of the drafts a request verifies, or None."""
        input_ids, tables, starts, query_lens = [], [], [], []
        for s in out.scheduled:
            r, start = s.request, s.request.num_computed_tokens
            known = s.num_new_tokens - s.num_spec_tokens
            input_ids.extend(r.all_token_ids[start:start + known])
            input_ids.extend(r.spec_token_ids[:s.num_spec_tokens])
            tables.append(kv.block_tables[r.request_id])
            starts.append(start)
            query_lens.append(s.num_new_tokens)
        attn, positions = build_metadata(tables, starts, query_lens, kv.block_size, device,
                                         recurrent=kv.step_state(out.scheduled))
        sampling = [i for i, s in enumerate(out.scheduled) if s.samples]
        logits_rows = []
        # the last verified token and the drafts: the request's last k + 1 tokens
        for i in sampling:
            end = attn.query_start_loc_host[i + 1]
            logits_rows.extend(range(end - out.scheduled[i].num_spec_tokens - 1, end))
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        logits_indices = torch.tensor(logits_rows, dtype=torch.long, device=device)
        sampling_batch = None
        if sampling:
            sampled = [out.scheduled[i] for i in sampling]
            sampling_batch = _sampling_batch(sampled, vocab_size, device, draft_probs_of)
        return cls(out.scheduled, ids, positions, attn, sampling, logits_indices, sampling_batch)


def _sampling_batch(scheduled: list[ScheduledRequest], vocab_size: int, device,
                    draft_probs_of) -> SamplingBatch:
    reqs = [s.request for s in scheduled]
    return SamplingBatch.build(
        [r.sampling_params for r in reqs], [r.prompt_token_ids for r in reqs],
        [r.output_token_ids for r in reqs], [r.noise for r in reqs], vocab_size, device,
        draft_token_ids=[s.request.spec_token_ids[:s.num_spec_tokens] for s in scheduled],
        draft_probs=[draft_probs_of(s) for s in scheduled],
        eos_token_ids=[r.eos_token_ids for r in reqs])
