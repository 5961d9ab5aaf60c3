"""Model runner: owns the KV tensors, turns a SchedulerOutput into model inputs, runs the model, samples."""

from __future__ import annotations

import torch

from mtpserve.engine.kv_cache import KVCacheManager
from mtpserve.engine.sampler import Sampler
from mtpserve.engine.scheduler import SchedulerOutput
from mtpserve.kernels.attention import AttentionMetadata, TorchPagedAttention


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


class ModelRunner:
    def __init__(self, model, kv: KVCacheManager, num_blocks: int, dtype: torch.dtype, device: torch.device):
        cfg = model.config
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = kv.block_size
        shape = (num_blocks, kv.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(cfg.num_hidden_layers)]
        self.attn = TorchPagedAttention()
        self.sampler = Sampler()

    def prepare_inputs(self, out: SchedulerOutput):
        """Flattened input_ids/positions and the attention metadata for one step."""
        input_ids, positions, rows, query_lens, seq_lens = [], [], [], [], []
        tables = []
        for row, s in enumerate(out.scheduled):
            r, n, start = s.request, s.num_new_tokens, s.request.num_computed_tokens
            input_ids.extend(r.all_token_ids[start:start + n])
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
            query_lens=query_lens, seq_lens_host=seq_lens, block_size=bs)
        return torch.tensor(input_ids, dtype=torch.long, device=dev), pos.to(dev), meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        """Run one step; returns the sampled token(s) of every request that reached its end."""
        input_ids, positions, meta = self.prepare_inputs(out)
        self.attn.prepare(meta)
        hidden = self.model(input_ids, positions, self.kv_caches, self.attn)
        ends = torch.tensor(meta.query_lens).cumsum(0) - 1
        sampling = [i for i, s in enumerate(out.scheduled) if s.samples]
        if not sampling:
            return {}
        logits = self.model.compute_logits(hidden[ends[sampling].to(hidden.device)])
        reqs = [out.scheduled[i].request for i in sampling]
        result = self.sampler(logits, [r.sampling_params for r in reqs], [r.prompt_token_ids for r in reqs],
                              [r.output_token_ids for r in reqs], [r.generator for r in reqs])
        tokens = result.token_ids.tolist()
        return {r.request_id: [t] for r, t in zip(reqs, tokens)}
