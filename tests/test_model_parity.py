"""Logits parity with transformers (the independent reference) through the paged KV cache, float32."""

from __future__ import annotations

import pytest
import torch
from conftest import load_reference_model
from engine_helpers import compute, make_engine, new_request

ATOL = 2e-4


def reference_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def check_model(path: str, chunks: list[int], decode_steps: int = 12) -> None:
    hf = load_reference_model(path)
    engine = make_engine(path)
    g = torch.Generator().manual_seed(1)
    vocab = engine.model_config.vocab_size
    prompt_len = sum(chunks)
    ids = torch.randint(0, vocab, (prompt_len + decode_steps,), generator=g).tolist()
    ref = reference_logits(hf, ids)
    req = new_request(engine, ids[:prompt_len])
    ours, done = [], 0
    for n in chunks:  # prefill, possibly chunked
        ours.append(compute(engine, [(req, n)])[0])
        done += n
    for t in ids[prompt_len:]:  # then one token at a time through the cache
        req.all_token_ids.append(t)
        ours.append(compute(engine, [(req, 1)])[0])
    ours = torch.cat(ours)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4)
    engine.kv.free(req.request_id)
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_qwen3_dir"])
@pytest.mark.parametrize("chunks", [[17], [5, 7, 1, 4]])
def test_prefill_and_decode_match_transformers(request, fixture, chunks):
    check_model(request.getfixturevalue(fixture), chunks)


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    ("llama", {"attention_bias": True, "tie_word_embeddings": True}),
    ("mistral", {}),
    ("qwen3", {"num_key_value_heads": 4}),
])
def test_variants_match_transformers(make_checkpoint, model_type, overrides):
    check_model(make_checkpoint(model_type, **overrides), [9, 6])


def test_batched_step_matches_single(tiny_qwen3_dir):
    """Several requests in one flattened step (mixed prefill and decode) give each its own logits."""
    hf = load_reference_model(tiny_qwen3_dir)
    engine = make_engine(tiny_qwen3_dir)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 11, 6)]
    reqs = [new_request(engine, p, f"r{i}") for i, p in enumerate(prompts)]
    compute(engine, [(reqs[0], 3)])
    compute(engine, [(reqs[1], 4)])
    # one step: req0 decodes one token, req1 finishes its prefill, req2 prefills completely
    reqs[0].all_token_ids.append(7)
    out = compute(engine, [(reqs[0], 1), (reqs[1], 7), (reqs[2], 6)])
    torch.testing.assert_close(out[0][-1], reference_logits(hf, prompts[0] + [7])[-1], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[1], reference_logits(hf, prompts[1])[4:], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[2], reference_logits(hf, prompts[2]), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_transformers(tiny_llama_dir, dtype):
    """bf16 / fp16 weights, activations and KV cache: logits near the float32 reference."""
    hf = load_reference_model(tiny_llama_dir)
    engine = make_engine(tiny_llama_dir, dtype=dtype)
    assert engine.runner.kv_caches[0][0].dtype == dtype
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    req = new_request(engine, ids[:12])
    ours = [compute(engine, [(req, 12)])[0]]
    for t in ids[12:]:
        req.all_token_ids.append(t)
        ours.append(compute(engine, [(req, 1)])[0])
    ours = torch.cat(ours).float()
    ref = reference_logits(hf, ids)
    assert (ours - ref).abs().max() < 0.1 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
