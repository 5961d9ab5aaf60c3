"""The real SmolLM2-135M-Instruct GGUF: our greedy continuations equal transformers' on the same file."""

from __future__ import annotations

import re

import pytest
import torch

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.sampling_params import SamplingParams

CHATS = [
    "Write a Python function that reverses a list.",
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for better sleep.",
    "List the first five prime numbers as a JSON array.",
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def engine(smollm2_checkpoint):
    return LLMEngine(smollm2_checkpoint, EngineConfig(kv_cache_memory_bytes=64 * 2**20))


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    return smollm2_reference


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' forward and its own KV cache, continuing past EOS (as
    ignore_eos does on our side; generate() would stop or suppress EOS)."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def test_greedy_chat_continuations_match_transformers(engine, reference):
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False)
               for c in CHATS]
    ours = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    for p, r in zip(prompts, ours):
        assert r.output_token_ids == reference_greedy(reference, p, NEW_TOKENS), tok.decode(p)
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_prompt_logits_match_transformers(engine, reference):
    """Logits over a prompt's positions (prefill through the paged cache) against transformers."""
    from engine_helpers import compute, new_request

    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    req = new_request(engine, ids, "logits")
    (ours,) = compute(engine, [(req, len(ids))])
    engine.kv.free(req.request_id)
    with torch.inference_mode():
        ref = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_shipped_head_accepts_and_is_lossless_on_smollm2(smollm2_checkpoint):
    """SmolLM2 with the head shipped for it (trained, reduced draft vocabulary), float64 so the verify and decode
    matmuls cannot disagree on a near-tie: greedy output identical to plain decoding, and the drafts are
    accepted often (both the accept and the reject paths run)."""
    from mtpserve.engine.loader.mtp_head import default_head_path

    tok = smollm2_checkpoint.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False)
               for c in (CHATS[0], CHATS[3])]  # code and JSON: on prose the head accepts less (docs/ACCEPTANCE.md)
    params = SamplingParams(temperature=0, max_tokens=48)
    config = dict(dtype=torch.float64, kv_cache_memory_bytes=64 * 2**20)
    plain = LLMEngine(smollm2_checkpoint, EngineConfig(spec_draft_n_max=0, **config)).generate(prompts, params)
    engine = LLMEngine(smollm2_checkpoint, EngineConfig(mtp_head=default_head_path(), spec_draft_n_max=3,
                                                        spec_adaptive=False, **config))
    spec = engine.generate(prompts, params)
    assert re.search(r"MTP 1 layer\(s\), draft vocabulary \d+ of 49152, up to 3 drafts per step \(fixed\)$",
                     engine.summary())
    assert [r.output_token_ids for r in spec] == [r.output_token_ids for r in plain]
    stats = engine.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert stats.mean_acceptance_length > 1.5


def test_start_up_summary_names_the_gguf_format(engine):
    summary = engine.summary()
    assert "weights GGUF Q4_1, dequantized" in summary and "dtype float32" in summary
    assert f"max_model_len {engine.max_model_len}," in summary and engine.max_model_len < 8192  # a 64 MiB cache
