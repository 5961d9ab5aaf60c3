"""Sampler tests against independent references (numpy, transformers, hand formulas)."""

from collections import Counter

import numpy as np
import pytest
import torch

from mtpserve.engine.errors import RequestError
from mtpserve.engine.noise import TOKEN, RequestNoise, keys
from mtpserve.engine.sampler import Sampler, SamplingTensors, apply_penalties, processed_probs, sample_from_probs
from mtpserve.engine.sampling_params import SamplingParams


def run(logits, params, prompts=None, outputs=None, seeds=None):
    batch = logits.shape[0]
    prompts = prompts or [[] for _ in range(batch)]
    outputs = outputs or [[] for _ in range(batch)]
    seeds = seeds or [p.seed for p in params]
    return Sampler()(logits, params, prompts, outputs, [RequestNoise.of(s) for s in seeds])


def ref_filtered_probs(logits, temperature, top_k, top_p, min_p):
    """Naive per-row reference in float64: temperature, top-k, top-p, min-p, softmax."""
    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()
    x = logits.astype(np.float64) / temperature
    if top_k > 0:
        kth = sorted(x, reverse=True)[min(top_k, len(x)) - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1:
        probs = softmax(x)
        keep, mass = [], 0.0
        for idx in sorted(range(len(x)), key=lambda i: -probs[i]):
            if mass >= top_p:
                break
            keep.append(idx)
            mass += probs[idx]
        x = np.where(np.isin(np.arange(len(x)), keep), x, -np.inf)
    if min_p > 0:
        probs = softmax(x)
        x = np.where(probs < min_p * probs.max(), -np.inf, x)
    return softmax(x)


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    out = run(logits, [SamplingParams(temperature=0.0) for _ in range(5)])
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_top_k_one_equals_greedy():
    logits = torch.randn(6, 200, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(6)]
    assert torch.equal(run(logits, params).token_ids, logits.argmax(-1))


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 5, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (1.3, 0, 1.0, 0.1), (0.9, 20, 0.9, 0.05),
    (1.0, -1, 0.5, 0.0), (2.0, 3, 0.95, 0.2), (0.5, 64, 1.0, 0.0), (1.0, 100, 0.3, 0.0),
])
def test_filtering_matches_reference(temperature, top_k, top_p, min_p):
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    # mix in an unfiltered row so per-row settings are exercised
    all_params = [params, SamplingParams(), params, params]
    tensors = SamplingTensors.from_params(all_params, 64, "cpu")
    probs = processed_probs(logits, tensors).numpy()
    for row, p in enumerate(all_params):
        ref = ref_filtered_probs(logits[row].numpy(), p.temperature, p.top_k, p.top_p, p.min_p)
        np.testing.assert_array_equal(probs[row] > 0, ref > 0)
        np.testing.assert_allclose(probs[row], ref, atol=1e-6, rtol=1e-5)


def _rows_for_candidate_cuts(vocab: int) -> torch.Tensor:
    """Rows whose top-k / top-p cuts fall among the first few largest logits and rows where they
    do not: peaked, flat, and tied at the would-be k-th largest."""
    g = torch.Generator().manual_seed(12)
    peaked = torch.randn(3, vocab, generator=g) * 6
    flat = torch.randn(3, vocab, generator=g) * 0.1
    tied = torch.randn(2, vocab, generator=g)
    tied[:, :40] = 9.0  # 40 tokens share the largest logit
    return torch.cat([peaked, flat, tied])


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.3), (5, 1.0), (30, 1.0), (200, 0.8),
                                         (5, 0.5), (0, 0.999)])
def test_filtering_among_the_largest_logits_matches_reference(monkeypatch, top_k, top_p):
    """The cut is looked for among the largest logits first, widening, the rest taken whole; with
    few candidates every way is taken, and every row keeps what the reference keeps."""
    from mtpserve.engine import truncation
    monkeypatch.setattr(truncation, "WIDTHS", (16, 64))
    vocab = 300
    logits = _rows_for_candidate_cuts(vocab)
    params = [SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)] * logits.shape[0]
    probs = processed_probs(logits, SamplingTensors.from_params(params, vocab, "cpu")).numpy()
    for row in range(logits.shape[0]):
        ref = ref_filtered_probs(logits[row].numpy(), 1.0, top_k, top_p, 0.0)
        # which of several tied tokens top-p keeps is arbitrary (here and in the reference): the
        # kept probabilities, in order, are what must agree
        np.testing.assert_allclose(np.sort(probs[row]), np.sort(ref), atol=1e-6, rtol=1e-5)
        if row < 6:
            np.testing.assert_array_equal(probs[row] > 0, ref > 0)


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.0, 0.9), (1.5, 1.0), (0.3, 1.0)])
def test_cpu_race_draws_what_the_whole_race_draws(temperature, top_p):
    """The CPU kernels' race, which skips the tokens that cannot win, picks the token of the race
    over every token's exponential (noise.exponentials), for every seed and position."""
    from mtpserve.engine.noise import exponentials
    from mtpserve.kernels import cpu_blocks
    from mtpserve.kernels.cpu_race import race_argmax
    if not cpu_blocks.available():
        pytest.skip("the CPU kernels do not build here")
    vocab = 5000
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(1, vocab, generator=g).expand(400, vocab) * 4
    logits = logits + torch.randn(400, vocab, generator=g) * 0.5
    params = [SamplingParams(temperature=temperature, top_p=top_p)] * 400
    probs = processed_probs(logits, SamplingTensors.from_params(params, vocab, "cpu"))
    noises = [RequestNoise(seed % 7) for seed in range(400)]
    positions = list(range(400))
    pairs = [keys(n.seed, p, TOKEN) for n, p in zip(noises, positions)]
    fast = race_argmax(probs, pairs)
    whole = (probs / exponentials(noises, positions, TOKEN, vocab, "cpu")).argmax(dim=-1)
    assert torch.equal(fast, whole)
    assert torch.equal(sample_from_probs(probs, noises, positions), whole)
    assert len(set(whole.tolist())) > 3


def test_filtering_keeps_at_least_one_token():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    tensors = SamplingTensors.from_params([SamplingParams(top_p=1e-6, min_p=1.0)], 4, "cpu")
    assert processed_probs(logits, tensors).tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_temperature_distribution():
    from scipy import stats as scipy_stats
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])
    temperature, n = 0.7, 20000
    tensors = SamplingTensors.from_params([SamplingParams(temperature=temperature)] * n, 8, "cpu")
    probs = processed_probs(logits.expand(n, 8), tensors)
    tokens = sample_from_probs(probs, [RequestNoise(1234)] * n, list(range(n)))  # one request, n positions
    observed = np.bincount(tokens.numpy(), minlength=8)
    expected = torch.softmax(logits.double() / temperature, -1).numpy() * n
    assert scipy_stats.chisquare(observed, expected).pvalue > 1e-3


def test_seed_reproducible_and_independent_of_batch():
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=1.0, seed=11), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.8, top_p=0.9, seed=22),
              SamplingParams(temperature=1.2, top_k=50, seed=33)]
    first = run(logits, params).token_ids
    assert torch.equal(first, run(logits, params).token_ids)
    for row in (0, 2, 3):
        alone = run(logits[row:row + 1], [params[row]]).token_ids
        assert alone.item() == first[row].item()
    # a different seed does change the draws somewhere over a few steps
    other = [SamplingParams(temperature=1.0, seed=s) for s in range(10)]
    draws = run(logits[:1].expand(10, 500), other).token_ids
    assert len(set(draws.tolist())) > 1


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4)) * 2
    prompts = [[1, 2, 3, 3], [10, 11], []]
    outputs = [[4, 1], [], [7, 7, 8]]
    penalties = [1.3, 0.8, 2.0]
    params = [SamplingParams(repetition_penalty=r) for r in penalties]
    tensors = SamplingTensors.from_params(params, 50, "cpu")
    got = apply_penalties(logits, tensors, prompts, outputs)
    for row in range(3):
        ids = torch.tensor([prompts[row] + outputs[row]])
        ref = RepetitionPenaltyLogitsProcessor(penalties[row])(ids, logits[row:row + 1].clone())
        torch.testing.assert_close(got[row], ref[0])


def test_presence_frequency_penalty_hand_formula():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(5))
    prompts = [[0, 1, 2], [5]]
    outputs = [[3, 3, 3, 4], [5, 6, 6]]
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5)]
    got = apply_penalties(logits, SamplingTensors.from_params(params, 30, "cpu"), prompts, outputs)
    expected = logits.clone()
    for row, p in enumerate(params):
        for token, count in Counter(outputs[row]).items():
            expected[row, token] -= p.frequency_penalty * count + p.presence_penalty
    torch.testing.assert_close(got, expected)


def test_no_penalties_is_noop():
    logits = torch.randn(2, 10)
    tensors = SamplingTensors.from_params([SamplingParams(), SamplingParams()], 10, "cpu")
    assert apply_penalties(logits, tensors, [[1, 2], [3]], [[4], []]) is logits


def test_penalties_apply_to_greedy():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    assert run(logits, params, prompts=[[0]], outputs=[[]]).token_ids.item() == 1


def test_mixed_greedy_and_sampled_batch():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=7),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=1, seed=8),
              SamplingParams(temperature=1.1, min_p=0.1, seed=9)]
    out = run(logits, params)
    assert out.token_ids.dtype == torch.long
    argmax = logits.float().argmax(-1)
    for row in (0, 2, 3):
        assert out.token_ids[row].item() == argmax[row].item()
    for row in (1, 4):
        assert out.token_ids[row].item() == run(logits[row:row + 1], [params[row]]).token_ids.item()


def test_logprobs_from_raw_logits():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(10))
    params = [SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5),
              SamplingParams(), SamplingParams(temperature=0.5, logprobs=0, seed=1)]
    out = run(logits, params, prompts=[[0, 1, 2], [], []], outputs=[[], [], []])
    ref = torch.log_softmax(logits.double(), -1)
    assert out.logprobs[1] is None
    chosen, top = out.logprobs[0]
    assert chosen == pytest.approx(ref[0, out.token_ids[0]].item(), abs=1e-5)
    ref_top = ref[0].topk(3)
    assert [t for t, _ in top] == ref_top.indices.tolist()
    assert [v for _, v in top] == pytest.approx(ref_top.values.tolist(), abs=1e-5)
    chosen, top = out.logprobs[2]
    assert top == [] and chosen == pytest.approx(ref[2, out.token_ids[2]].item(), abs=1e-5)


def test_validate_accepts_defaults():
    SamplingParams().validate()
    SamplingParams(temperature=0.0, top_k=-1, top_p=1.0, min_p=1.0, presence_penalty=2.0,
                   frequency_penalty=-2.0, stop_token_ids=[0, 5], logprobs=0, seed=3).validate()
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.1), ("temperature", float("inf")),
    ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.1), ("top_p", float("nan")),
    ("top_k", -2), ("min_p", -0.1), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")), ("presence_penalty", 2.5),
    ("presence_penalty", float("-inf")), ("frequency_penalty", -3.0), ("stop_token_ids", [1, -1]),
    ("logprobs", -1),
])
def test_validate_rejects(field, value):
    with pytest.raises(RequestError) as info:
        SamplingParams(**{field: value}).validate()
    assert info.value.param == field
    assert info.value.code == "invalid_request"
