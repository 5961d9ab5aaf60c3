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


def run_batch(engine, monkeypatch, params, spec_n_max: list[int | None], noise: RequestNoise | None = None) -> list:
    """Generate the prompts in one batch (request i drafting up to ``spec_n_max[i]``; ``noise``: every request's
    randomness, in place of the one it was given), then undo ``monkeypatch``'s spies; the requests."""
    reqs = [engine.add_request(f"r{i}", p, params, spec_n_max=n) for i, (p, n) in
            enumerate(zip(prompts(engine), spec_n_max))]
    if noise is not None:
        for r in reqs:
            r.noise = noise
    while any(not r.status.finished for r in reqs):
        engine.step()
    monkeypatch.undo()
    return reqs


def recorded_drafts(engine, monkeypatch, one_call: bool, spec_n_max: list[int | None], params=GREEDY):
    """Every proposal of a batch of the prompts (request i drafting up to ``spec_n_max[i]``), and the requests."""
    proposer = engine.runner.proposer
    if not one_call:
        monkeypatch.setattr(proposer, "one_call_drafter", lambda requests: None)
    propose = proposer.propose
    proposals = []

    def spy(items, p_min=0.0):
        out = propose(items, p_min)
        proposals.append(out)
        return out

    monkeypatch.setattr(proposer, "propose", spy)
    reqs = run_batch(engine, monkeypatch, params, spec_n_max)
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


def paired_drafts(engine, monkeypatch, params=GREEDY, noise: RequestNoise | None = None) -> list[tuple]:
    """Every proposal of a batch of the prompts made by both paths from the same state: the per-step path first, then
    the one-call path, whose drafts and KV the engine keeps. Per request and proposal: (one-call drafts, per-step
    drafts, the per-step path's margin between its two largest draft logits at each draft (greedy; else None),
    one-call q, per-step q (unseeded sampling; else empty), the per-step path's top draft probability at each draft
    (greedy; else None))."""
    proposer = engine.runner.proposer
    one_call = proposer._propose_fused
    draft_logits = proposer.mtp.draft_logits
    margins, tops = [], []
    pairs = []

    def recording_draft_logits(step, y):
        logits = draft_logits(step, y)
        top = logits.float().topk(2, -1).values
        margins.append((top[:, 0] - top[:, 1]).tolist())
        tops.append(torch.softmax(logits.float(), -1).amax(-1).tolist())
        return logits

    def per_draft(values, items, active, per_step) -> list[list]:
        """Recorded rows of values, one a draft step, as each item's list (None where not drafted)."""
        out = [[None] * it.num_drafts for it in items]
        for step, row in enumerate(values):
            reached = [i for i in active if items[i].num_drafts > step and len(per_step[i]) >= step]
            for i, value in zip(reached, row):
                out[i][step] = value
        return out

    def both(drafter, items, p_min):
        margins.clear()
        tops.clear()
        active = [i for i, it in enumerate(items) if it.num_drafts]
        per_step, per_step_q = proposer._propose_per_step(items, active, p_min)
        item_margins = per_draft(margins, items, active, per_step)
        item_tops = per_draft(tops, items, active, per_step)
        drafts, q = one_call(drafter, items, p_min)
        pairs.extend(zip(drafts, per_step, item_margins, q, per_step_q, item_tops))
        return drafts, q

    monkeypatch.setattr(proposer.mtp, "draft_logits", recording_draft_logits)
    monkeypatch.setattr(proposer, "_propose_fused", both)
    run_batch(engine, monkeypatch, params, [None] * len(CHATS), noise)
    return pairs


def count_equal(pairs: list[tuple], max_margin: float | None = None) -> tuple[int, int]:
    """Drafts compared, and drafts where the paths part. Each proposal is compared up to its first parted draft (the
    drafts after it continue from different tokens); with ``max_margin``, the per-step path's two best logits must be
    within it there (a near tie)."""
    compared, parted = 0, 0
    for drafts, per_step, margins, *_ in pairs:
        assert len(drafts) == len(per_step)
        for j, (a, b) in enumerate(zip(drafts, per_step)):
            compared += 1
            if a != b:
                parted += 1
                if max_margin is not None:
                    assert margins[j] < max_margin
                break
    return compared, parted


@pytest.mark.parametrize("spec_n_max", [[None, None, None], [3, 1, 2]])
def test_drafts_equal_the_per_step_path(engine, monkeypatch, spec_n_max):
    """The same text, and, from the same state, the same drafts for a batch whose requests draft 3 tokens each, and for
    one whose requests draft 3, 1 and 2 (rows leave the loop at different steps). Both multiply the same rounded
    activations by the same block weights; only their norms differ in the last bits (C++ here, PyTorch there), which
    can move an activation across a rounding step of its 8-bit block and the logits by a few hundredths: the paths
    may part only at a near tie of the head's two best logits (seen: 1 in 200 drafts, at a margin of 0.025)."""
    fused, fused_reqs = recorded_drafts(engine, monkeypatch, True, spec_n_max)
    per_step, per_step_reqs = recorded_drafts(engine, monkeypatch, False, spec_n_max)
    for a, b in zip(fused_reqs, per_step_reqs):
        assert a.output_token_ids == b.output_token_ids  # verification keeps both lossless
    fused, per_step = by_request(fused), by_request(per_step)
    assert [[len(d) for d in fused[rid]] for rid in fused] == [[len(d) for d in per_step[rid]] for rid in fused]
    assert [len(fused[f"r{i}"][0]) for i in range(len(CHATS))] == [n or 3 for n in spec_n_max]
    compared, parted = count_equal(paired_drafts(engine, monkeypatch), max_margin=0.1)
    assert compared > 100
    assert parted <= compared // 50


@pytest.mark.parametrize("shape", [{}, {"top_p": 0.9}, {"top_k": 20}, {"min_p": 0.1}, {"top_k": 50, "top_p": 0.8}])
def test_seeded_sampled_drafts_equal_the_per_step_path(engine, monkeypatch, shape):
    """At T = 0.7 with a seed, with and without top-k, top-p and min-p, the drafts race on the keys the emitted tokens
    race on: the same text, and from the same state the same drafts as the per-step path's draws (PyTorch's cuts,
    softmax and race there; ours here), but where the norms' last bits move q enough to turn a near tie of two races
    or of a cut (seen: at most 1 in 60)."""
    params = SamplingParams(temperature=0.7, seed=7, max_tokens=48, ignore_eos=True, **shape)
    _, fused_reqs = recorded_drafts(engine, monkeypatch, True, [None] * 3, params)
    _, per_step_reqs = recorded_drafts(engine, monkeypatch, False, [None] * 3, params)
    for a, b in zip(fused_reqs, per_step_reqs):
        assert a.output_token_ids == b.output_token_ids
    compared, parted = count_equal(paired_drafts(engine, monkeypatch, params))
    assert compared > 50
    assert parted <= compared // 30


@pytest.mark.parametrize("shape", [{}, {"top_p": 0.9, "min_p": 0.02}])
def test_unseeded_sampled_drafts_and_their_q_equal_the_per_step_path(engine, monkeypatch, shape):
    """Without a seed (rejection sampling), from the same state, the same drafts from the draft stream but at a near
    tie, and the q that verification reads close to the per-step path's. The two paths' norms differ in the last bits,
    which can move an activation across a rounding step of its 8-bit block, and the logits with it: most first drafts'
    q are equal to 1e-3 in total variation (seen: all but one of 49 below 0.003); under top-p a token at the edge of
    the cut can fall on either side (seen once: 0.052, its mass)."""
    params = SamplingParams(temperature=0.7, max_tokens=32, ignore_eos=True, **shape)
    pairs = paired_drafts(engine, monkeypatch, params, RequestNoise(1234, seeded=False))
    compared, parted = count_equal(pairs)
    assert compared > 30
    assert parted <= compared // 30
    distances = []
    for drafts, per_step, _, q, per_step_q, _ in pairs:
        if not drafts or drafts[0] != per_step[0]:
            continue
        a = torch.stack(q)
        b = torch.stack(per_step_q)
        assert torch.allclose(a.sum(-1), torch.ones(len(a)))
        distances.append(float((a[0] - b[0]).abs().sum() / 2))  # total variation of the first draft's q
    assert len(distances) > 10
    assert max(distances) < 0.1
    assert sum(d < 1e-3 for d in distances) >= 0.9 * len(distances)


def test_confidence_cut_stops_each_chain_where_the_head_doubts(engine, monkeypatch):
    """With p_min, a chain keeps its drafts while the product of the head's top probabilities (PyTorch's softmax of
    its draft logits on the per-step path) stays at or above p_min, and stops at the first draft that takes it below.
    The one-call path cuts at the same draft but where the product is within 0.01 of p_min or the drafts part at a
    near tie of the head's two best logits (its norms differ in the last bits)."""
    p_min = 0.3
    monkeypatch.setattr(engine.policy, "explicit_p_min", p_min)
    pairs = paired_drafts(engine, monkeypatch)
    cut, whole, differ = 0, 0, 0
    for drafts, per_step, margins, _, _, tops in pairs:
        reached = [t for t in tops if t is not None]
        if not reached:
            continue
        chain = [float(x) for x in torch.tensor(reached, dtype=torch.float64).cumprod(0)]
        kept = len(per_step)
        assert all(c >= p_min for c in chain[:kept])
        if kept < len(tops):
            assert chain[kept] < p_min
            cut += 1
        else:
            whole += 1
        if drafts != per_step:
            differ += 1
            same = 0
            while same < min(len(drafts), kept) and drafts[same] == per_step[same]:
                same += 1
            if same < min(len(drafts), kept):
                assert margins[same] < 0.1
            else:
                assert abs(chain[same] - p_min) < 0.01
    assert cut > 20 and whole > 20
    assert differ <= (cut + whole) // 30
