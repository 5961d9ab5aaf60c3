"""Engine end to end on tiny checkpoints: batching invariance, preemption, block accounting, errors."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import load_reference_model
from engine_helpers import greedy, make_engine

from mtpserve.engine.errors import RequestError
from mtpserve.engine.sampling_params import SamplingParams


def prompts(n: int, seed: int = 0, vocab: int = 300) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [torch.randint(5, vocab, (length,), generator=g).tolist() for length in lengths]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_generate(tiny_llama_dir):
    hf = load_reference_model(tiny_llama_dir)
    engine = make_engine(tiny_llama_dir)
    ps = prompts(4, seed=3)
    assert greedy(engine, ps, 24) == [hf_greedy(hf, p, 24) for p in ps]


def test_batching_invariance(tiny_qwen2_dir):
    """A request's greedy output is the same alone and inside a batch of 8 mixed-length requests."""
    engine = make_engine(tiny_qwen2_dir, max_num_batched_tokens=32)  # forces chunked prefill in the batch
    ps = prompts(8, seed=1)
    alone = [greedy(engine, [p], 20)[0] for p in ps]
    assert greedy(engine, ps, 20) == alone
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_preemption_under_tiny_cache(tiny_qwen3_dir):
    """With a cache far too small for the batch, requests are preempted and recomputed, never failed,
    and greedy outputs equal an unconstrained run."""
    ps = prompts(8, seed=2)
    roomy = greedy(make_engine(tiny_qwen3_dir), ps, 30)
    engine = make_engine(tiny_qwen3_dir, block_size=4, num_blocks=24)  # 96 token slots for 8 requests
    tight = greedy(engine, ps, 30)
    assert engine.scheduler.num_preemptions > 0
    assert tight == roomy
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_mixed_sampling_batch_is_reproducible(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    ps = prompts(4, seed=4)
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=s, ignore_eos=True) for s in range(3)]
    params.append(SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    first = [r.output_token_ids for r in engine.generate(ps, params)]
    alone = [engine.generate([p], sp)[0].output_token_ids for p, sp in zip(ps, params)]
    assert first == alone
    assert len(set(map(tuple, first))) == 4


def test_stop_token_ids_and_eos(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    p = prompts(1, seed=5)[0]
    full = greedy(engine, [p], 12)[0]
    stop_at = full[5]
    (r,) = engine.generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at], ignore_eos=True))
    assert r.output_token_ids == full[: full.index(stop_at) + 1] and r.finish_reason == "stop"
    engine.eos_token_ids = frozenset({stop_at})
    (r,) = engine.generate([p], SamplingParams(temperature=0, max_tokens=12))
    assert r.finish_reason == "stop" and r.output_token_ids[-1] == stop_at


def test_request_errors_and_abort(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_model_len=32)
    with pytest.raises(RequestError) as e:
        engine.add_request("long", list(range(5, 37)), SamplingParams())
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestError):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(RequestError):
        engine.add_request("bad-id", [10**6], SamplingParams())
    with pytest.raises(RequestError):
        engine.add_request("bad-param", [5], SamplingParams(top_p=0))
    req = engine.add_request("a", list(range(5, 25)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort_request("a")
    assert req.finish_reason == "abort" and not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    (r,) = engine.generate([list(range(5, 25))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    assert r.finish_reason == "length" and r.num_tokens == 32  # generation stops at max_model_len


def test_summary_and_a_warning_when_the_cache_caps_the_context(tiny_llama_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="mtpserve.engine.engine"):
        engine = make_engine(tiny_llama_dir, num_blocks=8, block_size=4, spec_draft_n_max=0)
    assert engine.max_model_len == 32
    assert "max_model_len is 32, below the" in caplog.text and "--kv-cache-memory" in caplog.text
    summary = engine.summary()
    assert summary.startswith("max_model_len 32, KV cache ") and "(8 blocks of 4 tokens)" in summary
    assert "dtype float32, weights safetensors float32" in summary and summary.endswith("MTP off (plain decoding)")
