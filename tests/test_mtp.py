"""MTP draft + verify on tiny checkpoints with a DeepSeek-style head (``--mtp-head`` format).

Losslessness tests run the engine in float64: verifying k + 1 tokens multiplies matrices of a
different shape than decoding one token, and in float32 that can flip a near-tie argmax. In float64
the rounding differences are ~1e-16, far below any argmax gap of these random models, so greedy
outputs with and without MTP must be identical token for token.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy, make_engine, price_drafting_cheaply
from mtp_helpers import save_distilled_head, save_random_head
from scipy.stats import chi2_contingency

from mtpserve.bench.engine_runs import twin as twin_engine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.train.distill import distill


def prompts(n: int, seed: int = 0, vocab: int = 300) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (n,), generator=g).tolist()
    return [torch.randint(5, vocab, (length,), generator=g).tolist() for length in lengths]


@pytest.fixture(scope="module")
def llama_head(tiny_llama_dir, tmp_path_factory):
    config = load_checkpoint(tiny_llama_dir).config
    return save_random_head(tmp_path_factory.mktemp("head"), config)


@pytest.fixture(scope="module")
def trained_head(tiny_qwen3_dir, tmp_path_factory):
    """A head distilled briefly on the model's own greedy outputs, so drafts are often right and both
    the accept and the reject paths run."""
    path, losses = save_distilled_head(tmp_path_factory.mktemp("qhead"), tiny_qwen3_dir, prompts(24, seed=7), 300)
    assert losses[-1] < losses[0]
    return path


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_lossless_random_head(tiny_llama_dir, llama_head, k):
    ps = prompts(6, seed=k)
    plain = greedy(make_engine(tiny_llama_dir, dtype=torch.float64, spec_draft_n_max=0), ps, 24)
    engine = make_engine(tiny_llama_dir, dtype=torch.float64, mtp_head=llama_head, spec_draft_n_max=k,
                         spec_adaptive=False)
    assert engine.mtp is not None
    assert greedy(engine, ps, 24) == plain  # mixed batch
    assert [greedy(engine, [p], 24)[0] for p in ps[:2]] == plain[:2]  # alone
    assert engine.spec_stats.num_draft_tokens > 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def check_stats(reqs) -> None:
    for r in reqs:
        s = r.spec_stats
        assert s.num_accepted_tokens <= s.num_draft_tokens
        assert all(a >= b for a, b in zip(s.accepted_per_position, s.accepted_per_position[1:]))
        assert sum(s.accepted_per_position) == s.num_accepted_tokens
        if r.finish_reason == "length":  # no stop truncation: every emitted token was kept
            assert len(r.output_token_ids) == s.num_accepted_tokens + s.num_steps


@pytest.mark.parametrize("k", [1, 3, 4])
def test_trained_head_accepts_and_stays_lossless(tiny_qwen3_dir, trained_head, k):
    # The distillation prompts (a tiny random model's continuations of random prompts barely generalize,
    # so acceptance is high only on what the head was trained on) plus two held-out ones.
    ps = prompts(24, seed=7)[:6] + prompts(2, seed=11)
    plain = greedy(make_engine(tiny_qwen3_dir, dtype=torch.float64, spec_draft_n_max=0), ps, 32)
    engine = make_engine(tiny_qwen3_dir, dtype=torch.float64, mtp_head=trained_head, spec_draft_n_max=k,
                         spec_adaptive=False)
    reqs = engine.generate(ps, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert [r.output_token_ids for r in reqs] == plain
    check_stats(reqs)
    stats = engine.spec_stats
    assert 0.15 < stats.acceptance_rate < 0.95  # both the accept and the reject paths ran
    assert all(c > 0 for c in stats.accepted_per_position[:2])  # fed-back draft steps are accepted too
    assert stats.num_draft_tokens == sum(r.spec_stats.num_draft_tokens for r in reqs)
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_chunked_prefill_preemption_and_adaptive(tiny_qwen3_dir, trained_head):
    """Prompt chunks fill the MTP KV too; preemption under a tiny cache recomputes both; adaptive k."""
    ps = prompts(24, seed=7)[6:14]
    plain = greedy(make_engine(tiny_qwen3_dir, dtype=torch.float64, spec_draft_n_max=0), ps, 40)
    engine = make_engine(tiny_qwen3_dir, dtype=torch.float64, mtp_head=trained_head, spec_draft_n_max=3,
                         block_size=4, num_blocks=40, max_num_batched_tokens=16)
    price_drafting_cheaply(engine)
    assert greedy(engine, ps, 40) == plain
    assert engine.scheduler.num_preemptions > 0
    assert engine.spec_stats.num_accepted_tokens > 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_twin_shares_weights_not_state(tiny_qwen3_dir, trained_head):
    """A twin engine (side-by-side benchmarks) reuses the weights and step costs but has its own KV cache,
    policy and requests: stepping both in turn gives each the output it gives alone."""
    ps = prompts(24, seed=7)[:6]
    plain = greedy(make_engine(tiny_qwen3_dir, dtype=torch.float64, spec_draft_n_max=0), ps, 24)
    engine = make_engine(tiny_qwen3_dir, dtype=torch.float64, mtp_head=trained_head, spec_draft_n_max=3)
    twin = twin_engine(engine)
    assert twin.model is engine.model and twin.mtp is engine.mtp and twin.policy.costs is engine.policy.costs
    assert twin.kv is not engine.kv and twin.policy is not engine.policy
    assert twin.runner.kv_caches[0][0].data_ptr() != engine.runner.kv_caches[0][0].data_ptr()
    price_drafting_cheaply(twin)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reqs = {e: [e.add_request(f"r{i}", p, params, spec_n_max=n) for i, p in enumerate(ps)]
            for e, n in ((engine, 0), (twin, None))}
    while engine.has_unfinished_requests() or twin.has_unfinished_requests():
        engine.step()
        twin.step()
    for e in (engine, twin):
        assert [r.output_token_ids for r in reqs[e]] == plain
        assert e.kv.num_free_blocks == e.kv.pool.num_blocks
    assert engine.spec_stats.num_draft_tokens == 0 < twin.spec_stats.num_accepted_tokens


def test_sampled_requests_reproducible_and_mixed(tiny_qwen3_dir, trained_head):
    engine = make_engine(tiny_qwen3_dir, mtp_head=trained_head, spec_draft_n_max=3, spec_adaptive=False)
    ps = prompts(4, seed=13)
    params = [SamplingParams(temperature=0.8, top_k=50, seed=s, max_tokens=24, ignore_eos=True) for s in range(3)]
    params.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    first = [r.output_token_ids for r in engine.generate(ps, params)]
    second = [r.output_token_ids for r in engine.generate(ps, params)]
    assert first == second
    assert first[3] == greedy(make_engine(tiny_qwen3_dir, spec_draft_n_max=0), [ps[3]], 24)[0]
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def seeded_params(n: int) -> list[SamplingParams]:
    """Sampled requests with a seed each; every other one with penalties (their rows follow the drafts)."""
    return [SamplingParams(temperature=0.8, top_p=0.95, seed=100 + i, max_tokens=24, ignore_eos=True,
                           presence_penalty=0.3 * (i % 2), repetition_penalty=1.0 + 0.1 * (i % 2)) for i in range(n)]


def test_seeded_output_depends_on_the_request_alone(tiny_qwen3_dir, trained_head):
    """float64: a seeded sampled request gives the same tokens with MTP off, with any fixed k, with adaptive
    drafting under any step-cost fit or plan, alone or batched, and under preemption; drafts are still accepted."""
    ps = prompts(24, seed=7)[:6] + prompts(2, seed=11)
    params = seeded_params(len(ps))

    def outputs(engine, batched=True):
        if batched:
            return [r.output_token_ids for r in engine.generate(ps, params)]
        return [engine.generate([p], [sp])[0].output_token_ids for p, sp in zip(ps, params)]

    def spec_engine(**config):
        return make_engine(tiny_qwen3_dir, dtype=torch.float64, mtp_head=trained_head, **config)

    plain = outputs(make_engine(tiny_qwen3_dir, dtype=torch.float64, spec_draft_n_max=0))
    for k in (1, 3):
        engine = spec_engine(spec_draft_n_max=k, spec_adaptive=False)
        assert outputs(engine) == plain
        assert engine.spec_stats.num_accepted_tokens > 0
    assert outputs(spec_engine(spec_draft_n_max=3, spec_adaptive=False), batched=False) == plain
    for scale in (0.05, 20.0):  # a step-cost fit that drafts as much, and as little, as it can
        engine = spec_engine(spec_draft_n_max=3)
        engine.policy.fit.scale = lambda batch_size, scale=scale: scale
        assert outputs(engine) == plain
    engine = spec_engine(spec_draft_n_max=3, block_size=4, num_blocks=40, max_num_batched_tokens=16)
    assert outputs(engine) == plain
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


@pytest.mark.parametrize("seeded", [True, False])
def test_sampled_distribution_matches_plain(make_checkpoint, tmp_path, seeded):
    """Temperature 1 on an 8-token vocabulary: the distribution of the 2nd and 3rd tokens (the ones
    drafts can affect) with MTP matches plain sampling (chi-square over 4000 requests per side), for
    seeded requests (coupled drafts) and unseeded ones (rejection sampling)."""

    path = make_checkpoint("llama", vocab_size=8, seed=3)
    config = load_checkpoint(path).config
    head = save_random_head(tmp_path / "head", config, scale=0.5, seed=5)
    n = 4000
    counts = []
    for spec in (0, 2):
        engine = make_engine(path, mtp_head=head, spec_draft_n_max=spec, spec_adaptive=False, max_num_seqs=256,
                             max_num_batched_tokens=1024)
        seeds = [i + 10_000 * spec if seeded else None for i in range(n)]  # independent sides
        reqs = engine.generate([[1, 2]] * n, [SamplingParams(temperature=1.0, seed=seed, max_tokens=3, ignore_eos=True)
                                              for seed in seeds])
        if spec:
            assert 0 < engine.spec_stats.num_accepted_tokens < engine.spec_stats.num_draft_tokens
        counts.append([[sum(r.output_token_ids[pos] == t for r in reqs) for t in range(8)] for pos in (1, 2)])
    for pos in range(2):
        table = [[c + 1 for c in counts[0][pos]], [c + 1 for c in counts[1][pos]]]
        assert chi2_contingency(table).pvalue > 1e-3


def test_two_chained_layers_match_a_dense_recomputation(tiny_llama_dir, tmp_path):
    """Two MTP layers: layer 1 drafts step 2 from (layer 0's output at p-1, t[p+1]), with its own KV filled
    over every computed position. Each second draft made after a right first draft must equal layer 1's
    prediction recomputed without any cache over the final sequence (DenseCausalAttention)."""
    from mtpserve.kernels.attention import DenseCausalAttention

    head = save_random_head(tmp_path / "head", load_checkpoint(tiny_llama_dir).config, num_layers=2, scale=0.3)
    engine = make_engine(tiny_llama_dir, dtype=torch.float64, mtp_head=head, spec_draft_n_max=2,
                         spec_adaptive=False, max_num_batched_tokens=8)  # chunked prefill too
    assert len(engine.mtp.layers) == 2 and len(engine.runner.kv_caches) == engine.model_config.num_hidden_layers + 2
    records = []
    propose = engine.runner.proposer.propose

    def recording(items, p_min=0.0):
        out = propose(items, p_min)
        for it in items:
            if it.request.request_id in out:
                records.append((it.start + len(it.next_tokens) - 1, out[it.request.request_id]))
        return out

    prompt = prompts(1, seed=21)[0] + [7, 8, 9]
    plain = greedy(make_engine(tiny_llama_dir, dtype=torch.float64, spec_draft_n_max=0), [prompt], 40)[0]
    distill(engine.mtp, engine.model, [prompt + plain], steps=60, lr=1e-2, depth=2)  # so some drafts are right
    engine.runner.proposer.propose = recording
    (req,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert req.output_token_ids == plain
    seq = torch.tensor(prompt + req.output_token_ids)
    attn, n = DenseCausalAttention(), len(seq)
    with torch.inference_mode():
        h = engine.model(seq, torch.arange(n), [None] * len(engine.model.layers), attn)
        y0 = engine.mtp(0, seq[1:], h[:-1], torch.arange(1, n), [None], attn)  # slot p = 0..n-2
        y1 = engine.mtp(1, seq[2:], y0[:-1], torch.arange(2, n), [None, None], attn)  # slot p = 1..n-2
        layer1 = engine.mtp.compute_logits(1, y1).argmax(-1)  # layer1[p - 1] predicts seq[p + 2]
    checked = 0
    for last, drafts in records:  # last: position of the newest known token's pair; drafts predict last+2, last+3
        if len(drafts) == 2 and last + 3 <= n and drafts[0] == int(seq[last + 2]):
            assert drafts[1] == int(layer1[last]), (last, drafts)
            checked += 1
    assert checked > 0


def test_logprobs_with_and_without_drafts(tiny_qwen3_dir, trained_head):
    """Logprobs of emitted tokens are the raw model's, whether a token came from a verified draft or not:
    compare against transformers' forward over the final sequence."""
    from conftest import load_reference_model

    hf = load_reference_model(tiny_qwen3_dir)
    prompt = prompts(24, seed=7)[0]  # a distillation prompt: drafts get accepted
    for spec in (0, 3):
        engine = make_engine(tiny_qwen3_dir, mtp_head=trained_head, spec_draft_n_max=spec, spec_adaptive=False)
        (req,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3))
        if spec:
            assert req.spec_stats.num_accepted_tokens > 0
        assert len(req.output_logprobs) == 16
        seq = torch.tensor([prompt + req.output_token_ids])
        with torch.inference_mode():
            ref = hf(seq).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        for j, (chosen, top) in enumerate(req.output_logprobs):
            assert abs(chosen - float(ref[j, req.output_token_ids[j]])) < 1e-3
            assert [t for t, _ in top] == ref[j].topk(3).indices.tolist()


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(temperature=0.9, top_p=0.8, top_k=20),
                                      dict(temperature=1.3, min_p=0.05)])
def test_sampled_drafts_over_the_draft_vocabulary_match_the_widened_logits(tiny_llama_dir, llama_head, settings):
    """Without penalties or a grammar, sampled drafts are chosen from the draft vocabulary's logits alone; q,
    widened with zeros, and the race's winners are those of the whole vocabulary's logits (-inf outside)."""
    from mtpserve.engine.noise import DRAFT, RequestNoise
    from mtpserve.engine.sampler import SamplingTensors, processed_probs, sample_from_probs

    engine = make_engine(tiny_llama_dir, dtype=torch.float64, mtp_head=llama_head, spec_draft_n_max=2)
    mtp = engine.mtp
    vocab_size = engine.model_config.vocab_size
    mtp.draft_vocab = torch.arange(3, vocab_size, 2)
    mtp._draft_heads.clear()
    y = torch.randn(6, engine.model_config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tensors = SamplingTensors.from_params([SamplingParams(**settings)] * 6, vocab_size, "cpu")
    wide = processed_probs(mtp.compute_logits(1, y).float(), tensors)
    narrow = mtp.widen(processed_probs(mtp.draft_logits(1, y).float(), tensors), 0.0)
    torch.testing.assert_close(narrow, wide)
    assert not narrow[:, :3].any() and not narrow[:, 4::2].any()
    noises = [RequestNoise(seed) for seed in range(6)]
    for position in range(20):
        positions = [position] * 6
        assert sample_from_probs(narrow, noises, positions, DRAFT).tolist() == \
            sample_from_probs(wide, noises, positions, DRAFT).tolist()
    assert mtp.vocab_ids(mtp.draft_logits(1, y).argmax(-1)).tolist() == mtp.compute_logits(1, y).argmax(-1).tolist()
