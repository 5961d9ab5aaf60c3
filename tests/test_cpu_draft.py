"""The draft loop in one kernel call (kernels/cpu/draft.cpp), greedy and sampled, against the per-step path it replaces
(engine/spec/proposer.py: the MTP layer, its head and argmax one step at a time), on the GGUF model's block weights
and the shipped head."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader.gguf import default_gguf_path, load_gguf
from mtpserve.engine.loader.mtp_head import default_head_path
from mtpserve.engine.noise import RequestNoise
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.kernels import cpu_blocks

pytestmark = pytest.mark.skipif(not cpu_blocks.available(), reason="no C++ compiler or no AVX2")

CHATS = [
    "Write a Python function that reverses a list.",
    "Why do leaves change color in autumn?",
    "List three fruits as a JSON array.",
]


@pytest.fixture(scope="module")
def engine():
    config = EngineConfig(kv_cache_memory_bytes=64 * 2**20, quantization="int4", mtp_head=default_head_path(),
                          spec_draft_n_max=3, spec_adaptive=False, enable_prefix_caching=False)
    return LLMEngine(load_gguf(default_gguf_path(), quantized=True), config)


def prompts(engine) -> list[list[int]]:
    tok = engine.tokenizer
    out = []
    for chat in CHATS:
        out.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": chat}]), add_special_tokens=False))
    return out


GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def recorded_drafts(engine, monkeypatch, one_call: bool, spec_n_max: list[int | None], params=GREEDY,
                    noise: RequestNoise | None = None, probs: list | None = None):
    """Every proposal of a batch of the prompts (request i drafting up to ``spec_n_max[i]``), and the requests.
    ``noise``: every request's randomness (in place of the one it was given); ``probs``: gets the draft q of each
    proposal (unseeded sampling)."""
    proposer = engine.runner.proposer
    if not one_call:
        monkeypatch.setattr(proposer, "one_call_drafter", lambda requests: None)
    propose = proposer.propose
    proposals = []

    def spy(items):
        out = propose(items)
        proposals.append(out)
        if probs is not None:
            probs.append({rid: proposer.draft_probs[rid].clone() for rid in out if rid in proposer.draft_probs})
        return out

    monkeypatch.setattr(proposer, "propose", spy)
    reqs = [engine.add_request(f"r{i}", p, params, spec_n_max=n) for i, (p, n) in
            enumerate(zip(prompts(engine), spec_n_max))]
    if noise is not None:
        for r in reqs:
            r.noise = noise
    while any(not r.status.finished for r in reqs):
        engine.step()
    monkeypatch.undo()
    return proposals, reqs


def by_request(proposals: list[dict[str, list[int]]]) -> dict[str, list[list[int]]]:
    """Each request's drafts, step by step."""
    out: dict[str, list[list[int]]] = {}
    for proposal in proposals:
        for rid, drafts in proposal.items():
            out.setdefault(rid, []).append(drafts)
    return out


def test_requests_without_penalties_or_grammars_draft_in_one_call(engine):
    proposer = engine.runner.proposer
    greedy = SimpleNamespace(sampling_params=SamplingParams(temperature=0))
    assert proposer.one_call_drafter([greedy, greedy]) is not None
    for params in (SamplingParams(temperature=0.7, top_k=-1), SamplingParams(temperature=0.7, top_p=0.9, top_k=40,
                                                                             min_p=0.05)):
        assert proposer.one_call_drafter([greedy, SimpleNamespace(sampling_params=params)]) is not None
    for params in (SamplingParams(temperature=0, repetition_penalty=1.2), SamplingParams(temperature=0.7,
                                                                                          presence_penalty=0.5)):
        assert proposer.one_call_drafter([greedy, SimpleNamespace(sampling_params=params)]) is None


def count_equal(fused: dict, per_step: dict) -> tuple[int, int]:
    """Drafts in all, and drafts equal at the same step and place."""
    num_drafts, num_equal = 0, 0
    for rid, proposals in fused.items():
        for da, db in zip(proposals, per_step[rid]):
            num_drafts += len(da)
            num_equal += sum(x == y for x, y in zip(da, db))
    return num_drafts, num_equal


@pytest.mark.parametrize("spec_n_max", [[None, None, None], [3, 1, 2]])
def test_drafts_equal_the_per_step_path(engine, monkeypatch, spec_n_max):
    """The same drafts, step by step, for a batch whose requests draft 3 tokens each, and for one whose requests draft
    3, 1 and 2 (rows leave the loop at different steps). Both multiply the same rounded activations by the same
    block weights; only their norms differ in the last bits (C++ here, PyTorch there), which could part them only at
    a near tie of the head's logits, and these prompts have none."""
    fused, fused_reqs = recorded_drafts(engine, monkeypatch, True, spec_n_max)
    per_step, per_step_reqs = recorded_drafts(engine, monkeypatch, False, spec_n_max)
    for a, b in zip(fused_reqs, per_step_reqs):
        assert a.output_token_ids == b.output_token_ids  # verification keeps both lossless
    fused, per_step = by_request(fused), by_request(per_step)
    assert [[len(d) for d in fused[rid]] for rid in fused] == [[len(d) for d in per_step[rid]] for rid in fused]
    assert [len(fused[f"r{i}"][0]) for i in range(len(CHATS))] == [n or 3 for n in spec_n_max]
    num_drafts, num_equal = count_equal(fused, per_step)
    assert num_drafts > 100
    assert num_equal == num_drafts


@pytest.mark.parametrize("shape", [{}, {"top_p": 0.9}, {"top_k": 20}, {"min_p": 0.1}, {"top_k": 50, "top_p": 0.8}])
def test_seeded_sampled_drafts_equal_the_per_step_path(engine, monkeypatch, shape):
    """At T = 0.7 with a seed, with and without top-k, top-p and min-p, the drafts race on the keys the emitted tokens
    race on: the same drafts as the per-step path's draws (PyTorch's cuts, softmax and race there; ours here, which
    could part them only at a near tie of two races or of a cut), and the same text."""
    params = SamplingParams(temperature=0.7, seed=7, max_tokens=48, ignore_eos=True, **shape)
    fused, fused_reqs = recorded_drafts(engine, monkeypatch, True, [None] * 3, params)
    per_step, per_step_reqs = recorded_drafts(engine, monkeypatch, False, [None] * 3, params)
    for a, b in zip(fused_reqs, per_step_reqs):
        assert a.output_token_ids == b.output_token_ids
    num_drafts, num_equal = count_equal(by_request(fused), by_request(per_step))
    assert num_drafts > 50
    assert num_equal == num_drafts


@pytest.mark.parametrize("shape", [{}, {"top_p": 0.9, "min_p": 0.02}])
def test_unseeded_sampled_drafts_and_their_q_equal_the_per_step_path(engine, monkeypatch, shape):
    """Without a seed (rejection sampling), the same drafts from the draft stream, and the q that verification reads
    a distribution close to the per-step path's: equal to rounding for the first draft, drawn from the same state;
    later ones within 0.05 in total variation (seen: at most 0.015), as the two loops' norms differ in the last bits,
    which can move an activation across a rounding step of its 8-bit block, and that step's logits with it."""
    params = SamplingParams(temperature=0.7, max_tokens=32, ignore_eos=True, **shape)
    noise = RequestNoise(1234, seeded=False)
    fused_q, per_step_q = [], []
    fused, _ = recorded_drafts(engine, monkeypatch, True, [None] * 3, params, noise, fused_q)
    per_step, _ = recorded_drafts(engine, monkeypatch, False, [None] * 3, params, noise, per_step_q)
    num_drafts, num_equal = count_equal(by_request(fused), by_request(per_step))
    assert num_drafts > 30
    assert num_equal == num_drafts
    compared = 0
    for a, b in zip(fused_q, per_step_q):
        assert a.keys() == b.keys()
        for rid in a:
            assert torch.allclose(a[rid].sum(-1), torch.ones(len(a[rid])))
            distance = (a[rid] - b[rid]).abs().sum(-1) / 2  # total variation, per draft
            assert distance[0] < 1e-5  # both from the same state: the softmax's rounding only
            assert distance.max() < 0.05
            compared += 1
    assert compared > 10
