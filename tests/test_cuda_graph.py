"""The bucketing and padding around CUDA graphs, on CPU: a batch padded up to a captured batch size
gives the same outputs as the unpadded one and writes nothing for its padded requests. (Capture and
replay need a GPU: tests/test_gpu.py.)"""

from __future__ import annotations

import os

import pytest
import torch
from engine_helpers import compute, make_engine, new_request

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

from mtpserve.engine.cuda_graph import StaticInputs, graph_batch_sizes, uniform_query_len
from mtpserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from mtpserve.kernels.attention import AttentionMetadata, TorchPagedAttention


def test_batch_sizes_reach_max_num_seqs():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_batch_sizes(1000)[-1] == 128


def _meta(query_lens, recurrent=None) -> AttentionMetadata:
    empty = torch.zeros(0)
    return AttentionMetadata(empty, empty, empty, empty, list(query_lens), [], 4,
                             recurrent=recurrent)


def test_only_uniform_steps_fit_a_graph():
    assert uniform_query_len(_meta([1, 1, 1])) == 1
    assert uniform_query_len(_meta([4, 4])) == 4
    assert uniform_query_len(_meta([1, 4])) is None  # a verify next to a decode
    assert uniform_query_len(_meta([])) is None
    assert uniform_query_len(_meta([1], recurrent=object())) is None  # hybrid models


def _step(engine, reqs, q):
    """Inputs of a step in which each request computes its next q tokens (ids from the prompt)."""
    out = SchedulerOutput([ScheduledRequest(r, q) for r in reqs])
    for r in reqs:
        assert engine.kv.allocate_slots(r.request_id, r.num_computed_tokens + q)
    return engine.runner.prepare(out)


def _host_view(inputs: StaticInputs, size: int, q: int, block_size: int) -> AttentionMetadata:
    """The bucket's metadata with host lists read back from the buffers (the torch backend plans
    on the host; the Triton one reads only the device tensors)."""
    meta = inputs.metadata(size, q, block_size)
    meta.seq_lens_host = meta.seq_lens.tolist()
    return meta


@pytest.mark.parametrize("q", [1, 3])
def test_padded_batch_equals_unpadded(tiny_llama_dir, q):
    engine = make_engine(tiny_llama_dir, dtype=torch.float64)
    prompts = [[3, 17, 5, 9, 11, 2, 8, 30, 4], [7, 7, 1, 40, 12, 6, 2, 19, 3], [5, 8, 13, 21, 34]]
    reqs = []
    for i, p in enumerate(prompts):
        r = new_request(engine, p, f"r{i}")
        compute(engine, [(r, len(p) - q)])  # the context, cached
        reqs.append(r)
    batch = _step(engine, reqs, q)
    runner = engine.runner
    runner.attn.prepare(batch.attn)
    want = engine.model(batch.input_ids, batch.positions, runner.kv_caches, runner.attn)
    caches = [tuple(c.clone() for c in kv) for kv in runner.kv_caches]

    size = 8  # three requests padded to a bucket of eight
    width = engine.kv.blocks_needed(64)
    inputs = StaticInputs.allocate(size, q, width, "cpu")
    # stale values from earlier steps
    inputs.block_tables.random_(0, engine.num_blocks)
    inputs.slot_mapping.random_(0, engine.num_blocks * engine.kv.block_size)
    inputs.input_ids.random_(0, 50)
    inputs.seq_lens.random_(1, 9)
    inputs.fill(batch.input_ids, batch.positions, batch.attn, size, q)
    meta = _host_view(inputs, size, q, engine.kv.block_size)
    attn = TorchPagedAttention()
    attn.prepare(meta)
    got = engine.model(inputs.input_ids[:size * q], inputs.positions[:size * q],
                       runner.kv_caches, attn)
    torch.testing.assert_close(got[:len(reqs) * q], want, rtol=0, atol=1e-12)
    written = batch.attn.slot_mapping
    for kv, kv0 in zip(runner.kv_caches, caches):
        for cache, before in zip(kv, kv0):
            flat = cache.flatten(0, 1)
            flat_before = before.flatten(0, 1)
            torch.testing.assert_close(flat[written], flat_before[written], rtol=0, atol=1e-12)
            untouched = torch.ones(flat.shape[0], dtype=torch.bool)
            untouched[written] = False
            assert torch.equal(flat[untouched], flat_before[untouched])  # padding wrote nowhere


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA run is in tests/test_gpu.py")
def test_padded_bucket_on_triton_backend(tiny_llama_dir):
    """The metadata a graph captures (no host lists) on the Triton backend, under the interpreter:
    the padded bucket's first rows equal the eager torch step's."""
    pytest.importorskip("triton")
    from mtpserve.kernels.triton_backend import TritonPagedAttention

    engine = make_engine(tiny_llama_dir, dtype=torch.float32)
    reqs = []
    for i, p in enumerate([[3, 17, 5, 9, 11, 2], [7, 7, 1, 40]]):
        r = new_request(engine, p, f"r{i}")
        compute(engine, [(r, len(p) - 2)])
        reqs.append(r)
    batch = _step(engine, reqs, 2)
    runner = engine.runner
    runner.attn.prepare(batch.attn)
    want = engine.model(batch.input_ids, batch.positions, runner.kv_caches, runner.attn)
    inputs = StaticInputs.allocate(4, 2, engine.kv.blocks_needed(64), "cpu")
    inputs.fill(batch.input_ids, batch.positions, batch.attn, 4, 2)
    attn = TritonPagedAttention()
    attn.prepare(inputs.metadata(4, 2, engine.kv.block_size))
    got = engine.model(inputs.input_ids[:8], inputs.positions[:8], runner.kv_caches, attn)
    torch.testing.assert_close(got[:4], want, rtol=2e-5, atol=2e-5)
