"""The Triton attention backend: the interface of ``TorchPagedAttention`` on Triton kernels.

``prepare`` keeps the step's metadata and the one host number the kernels need (the longest query);
``forward`` writes the new K/V through ``slot_mapping`` and attends, two launches per layer and no
host read, so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

from mtpserve.kernels.attention import AttentionBackend, AttentionMetadata
from mtpserve.kernels.triton_attention import paged_attention
from mtpserve.kernels.triton_kv import write_kv


class TritonPagedAttention(AttentionBackend):
    capturable = True

    def prepare(self, metadata: AttentionMetadata) -> None:
        self.meta = metadata
        self.max_query_len = max(metadata.query_lens, default=0)

    def forward(self, q, k, v, kv_cache, scale):
        meta = self.meta
        write_kv(k, v, kv_cache, meta.slot_mapping)
        if self.max_query_len == 0:
            return q.new_empty(q.shape)
        k_cache, v_cache = kv_cache
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                               meta.query_start_loc, self.max_query_len, scale)
