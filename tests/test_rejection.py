"""verify(): greedy acceptance on hand-made logits, losslessness of rejection sampling and of the seeded
(coupled) rule (chi-square against hand-computed distributions), penalties over draft-extended histories,
reproducibility."""

import pytest
import torch

from mtpserve.engine.noise import TOKEN, RequestNoise
from mtpserve.engine.sampler import Sampler, SamplingBatch, sample_from_probs
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.spec.rejection import verify

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0)


def one_hot_logits(tokens, vocab=8, high=5.0):
    """[len(tokens), vocab] logits whose argmax in row j is tokens[j]."""
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = high
    return logits


def noises(seeds, seeded=False):
    """Fixed seeds; ``seeded=False`` marks them as drawn by the engine (rejection sampling)."""
    return [RequestNoise(s, seeded=seeded) for s in seeds]


def verify_lists(logits, drafts, probs, params, prompts, outputs, request_noises):
    batch = SamplingBatch.build(params, prompts, outputs, request_noises, logits.shape[-1], logits.device,
                                draft_token_ids=drafts, draft_probs=probs)
    return verify(logits, batch)


def run(logits, drafts, probs, params, seeds=None, prompts=None, outputs=None, seeded=False):
    n = len(drafts)
    seeds = seeds if seeds is not None else list(range(n))
    return verify_lists(logits, drafts, probs, params, prompts or [[] for _ in range(n)],
                        outputs or [[] for _ in range(n)], noises(seeds, seeded))


def test_greedy_accepts_prefix_then_recovered_or_bonus():
    drafts = [3, 1, 4]
    all_ok = one_hot_logits([3, 1, 4, 6])
    assert run(all_ok, [drafts], [None], [GREEDY]) == [[3, 1, 4, 6]]          # 3 accepted + bonus 6
    second_wrong = one_hot_logits([3, 2, 4, 6])
    assert run(second_wrong, [drafts], [None], [GREEDY]) == [[3, 2]]          # 1 accepted + recovered 2
    first_wrong = one_hot_logits([5, 1, 4, 6])
    assert run(first_wrong, [drafts], [None], [GREEDY]) == [[5]]


def test_mixed_batch_of_draft_lengths_and_modes():
    vocab = 8
    # request 0: greedy, k=0; 1: greedy, k=1 (rejected); 2: greedy, k=3 (all accepted);
    # 3: sampled, k=3 with q == p, so every draft is accepted (u < 1 = p/q); 4: sampled, k=0
    rows0 = one_hot_logits([7], vocab)
    rows1 = one_hot_logits([2, 0], vocab)
    rows2 = one_hot_logits([1, 2, 3, 4], vocab)
    rows3 = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    rows4 = torch.randn(1, vocab, generator=torch.Generator().manual_seed(1))
    drafts3 = [0, 5, 6]
    logits = torch.cat([rows0, rows1, rows2, rows3, rows4])
    drafts = [[], [5], [1, 2, 3], drafts3, []]
    probs = [None, None, None, rows3[:3].softmax(-1), None]
    params = [GREEDY, GREEDY, GREEDY, SAMPLED, SAMPLED]
    out = run(logits, drafts, probs, params, seeds=[10, 11, 12, 13, 14])
    assert out[:3] == [[7], [2], [1, 2, 3, 4]]
    assert out[3][:3] == drafts3 and len(out[3]) == 4
    assert len(out[4]) == 1
    # k == 0 rows are exactly what the plain Sampler gives for the same noise
    plain = Sampler()(rows4, [SAMPLED], [[]], [[]], noises([14])).token_ids.tolist()
    assert out[4] == plain


def test_zero_drafts_match_plain_sampler():
    vocab = 50
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.8, top_p=0.9), GREEDY, SamplingParams(top_k=5, min_p=0.05),
              SamplingParams(temperature=1.3, presence_penalty=0.5), SAMPLED, GREEDY]
    outputs = [[1, 2], [3], [], [4, 4, 5], [], [0]]
    prompts = [[9], [], [8, 7], [], [6], []]
    seeds = [100 + i for i in range(6)]
    expected = Sampler()(logits, params, prompts, outputs, noises(seeds)).token_ids
    got = run(logits, [[] for _ in params], [None] * 6, params, seeds, prompts, outputs)
    assert got == [[t] for t in expected.tolist()]


def test_penalties_use_draft_extended_history():
    vocab = 6
    logits = torch.zeros(3, vocab)
    logits[0, 2] = 3.0                      # row 0 picks 2 (no history yet)
    logits[1, 2], logits[1, 3] = 3.0, 2.9   # row 1: 2 unless 2 is in the history
    logits[2, 5] = 3.0
    drafts = [[2, 2]]
    plain = run(logits, drafts, [None], [GREEDY])
    assert plain == [[2, 2, 5]]
    penalized = SamplingParams(temperature=0.0, presence_penalty=0.5)
    assert run(logits, drafts, [None], [penalized]) == [[2, 3]]
    # repetition penalty over prompt + output + drafts: 2 is in the history only through draft 1
    repeated = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert run(logits, drafts, [None], [repeated], prompts=[[4]], outputs=[[1]]) == [[2, 3]]
    # sampled with top_k=1: p is one-hot, so the verdict is deterministic
    q = torch.zeros(2, vocab)
    q[0, 2] = q[1, 2] = 1.0
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert run(logits, drafts, [q], [top1]) == [[2, 2, 5]]
    top1_penalized = SamplingParams(temperature=1.0, top_k=1, frequency_penalty=0.5)
    assert run(logits, drafts, [q], [top1_penalized]) == [[2, 3]]  # recovered from max(p - q, 0)


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError):
        run(torch.zeros(3, 4), [[1, 2, 3]], [None], [GREEDY])
    with pytest.raises(ValueError):
        run(torch.zeros(2, 4), [[1]], [None], [SAMPLED])   # rejection-sampled drafts need their q
    (out,) = run(torch.zeros(2, 4), [[1]], [None], [SAMPLED], seeded=True)  # seeded ones do not
    assert 1 <= len(out) <= 2 and all(0 <= t < 4 for t in out)


# ---- losslessness of the sampled path ----
#
# Power: N = 20,000 draws over V = 6 tokens. Moving 2% of probability mass between two tokens of
# probability 0.35 and 0.25 (the largest in P below, the hardest case) gives a chi-square
# noncentrality of N * (0.02^2/0.35 + 0.02^2/0.25) = 54.9; with 5 degrees of freedom the 0.001
# critical value is 20.5 and the power is 0.999 (0.92 for the 36-cell joint test, critical value
# 66.6). The false-alarm rate per check is 0.001 by construction, and the seeds are fixed.

NUM_SAMPLES = 20_000
BATCH = 2_000
P0 = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])
P1 = torch.tensor([0.10, 0.30, 0.20, 0.15, 0.15, 0.10])
P2 = torch.tensor([0.20, 0.20, 0.20, 0.20, 0.10, 0.10])
Q0 = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.25, 0.25])
Q1 = torch.tensor([0.40, 0.05, 0.05, 0.20, 0.10, 0.20])


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts, probs = counts.double().flatten(), probs.double().flatten()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of zero target probability was emitted"
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    statistic = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), statistic / 2).item()


def coupled_drafts(q, request_noises):
    """Drafts of seeded requests: position j drawn from q[j] with the target's race noise at j."""
    k = q.shape[0]
    columns = [sample_from_probs(q[j].expand(len(request_noises), -1), request_noises, [j] * len(request_noises),
                                 TOKEN) for j in range(k)]
    return torch.stack(columns, dim=1).tolist()


def sample_many(target_logits, q, params, seed, seeded):
    """NUM_SAMPLES verify calls (in batches of independent requests, one seed each). Unseeded: drafts drawn
    from q independently of the verifier's noise. Seeded: coupled drafts."""
    k = q.shape[0]
    draft_gen = torch.Generator().manual_seed(seed)
    results = []
    for batch in range(NUM_SAMPLES // BATCH):
        request_noises = noises([seed * 100_000 + batch * BATCH + r for r in range(BATCH)], seeded)
        if seeded:
            drafts = coupled_drafts(q, request_noises)
        else:
            drafts = torch.stack([torch.multinomial(q[j], BATCH, replacement=True, generator=draft_gen)
                                  for j in range(k)], dim=1).tolist()
        out = verify_lists(target_logits.repeat(BATCH, 1), drafts, [None if seeded else q] * BATCH,
                           [params] * BATCH, [[] for _ in range(BATCH)], [[] for _ in range(BATCH)], request_noises)
        results.extend(out)
    return results


def check_lossless(p_rows, q, params, target_logits, seed, seeded):
    """First emitted token ~ p_rows[0]; the second, when draft 1 was accepted, ~ p_rows[1]; and the
    pair (first, second) ~ p_rows[0] x p_rows[1], where a step that emitted only one token is
    continued the way the next step would: a plain draw from p_rows[1]."""
    vocab = p_rows.shape[1]
    results = sample_many(target_logits, q, params, seed, seeded)
    first = torch.bincount(torch.tensor([r[0] for r in results]), minlength=vocab)
    assert chi_square_p_value(first, p_rows[0]) > 1e-3

    second = torch.tensor([r[1] for r in results if len(r) >= 2])
    assert len(second) > NUM_SAMPLES // 5
    assert chi_square_p_value(torch.bincount(second, minlength=vocab), p_rows[1]) > 1e-3

    fresh = torch.multinomial(p_rows[1], NUM_SAMPLES, replacement=True,
                              generator=torch.Generator().manual_seed(seed + 1)).tolist()
    pairs = torch.tensor([r[0] * vocab + (r[1] if len(r) >= 2 else f) for r, f in zip(results, fresh)])
    joint = torch.outer(p_rows[0], p_rows[1])
    assert chi_square_p_value(torch.bincount(pairs, minlength=vocab * vocab), joint) > 1e-3


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_verify_is_lossless(seeded):
    p_rows = torch.stack([P0, P1, P2])
    check_lossless(p_rows, torch.stack([Q0, Q1]), SAMPLED, p_rows.log(), seed=1, seeded=seeded)


@pytest.mark.parametrize("seeded", [False, True])
def test_lossless_with_draft_vocab_subset(seeded):
    # q is zero outside {0, 2, 3}: tokens 1, 4, 5 can only come from recovered or bonus draws
    q = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0, 0.0],
                      [0.2, 0.0, 0.1, 0.7, 0.0, 0.0]])
    p_rows = torch.stack([P0, P1, P2])
    check_lossless(p_rows, q, SAMPLED, p_rows.log(), seed=2, seeded=seeded)


@pytest.mark.parametrize("seeded", [False, True])
def test_lossless_with_temperature_and_top_k(seeded):
    params = SamplingParams(temperature=0.7, top_k=4)

    def processed(logits):  # independent reference: temperature, keep the 4 largest, softmax
        scaled = logits / 0.7
        kth = scaled.topk(4, dim=-1).values[:, -1:]
        return scaled.masked_fill(scaled < kth, float("-inf")).softmax(-1)

    target_logits = torch.tensor([[1.0, 0.3, -0.2, 0.8, 0.5, -1.0],
                                  [0.0, 0.9, 0.4, -0.5, 0.6, 0.2],
                                  [0.2, 0.1, 0.0, -0.1, -0.2, 0.3]])
    draft_logits = torch.tensor([[0.0, 1.0, 0.5, 0.2, 0.8, 0.1],
                                 [0.7, 0.2, 0.9, 0.0, -0.3, 0.4]])
    check_lossless(processed(target_logits), processed(draft_logits), params, target_logits, seed=3,
                   seeded=seeded)


# ---- reproducibility ----

@pytest.mark.parametrize("seeded", [False, True])
def test_seeded_results_are_reproducible_and_batch_independent(seeded):
    vocab = 16
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(4, vocab, generator=gen)              # the request under test, k = 3
    q = (torch.randn(3, vocab, generator=gen)).softmax(-1)
    drafts = torch.multinomial(q, 1, generator=gen)[:, 0].tolist()
    params = SamplingParams(temperature=0.9, top_p=0.95)

    alone = [run(target, [drafts], [q], [params], seeds=[s], seeded=seeded)[0] for s in range(40)]
    assert alone == [run(target, [drafts], [q], [params], seeds=[s], seeded=seeded)[0] for s in range(40)]
    assert len({tuple(r) for r in alone}) > 1                 # the seed matters

    others = torch.randn(1 + 3 + 2, vocab, generator=gen)      # k = 0 sampled, k = 2 sampled, k = 1 greedy
    q_other = torch.randn(2, vocab, generator=gen).softmax(-1)
    for s in range(40):
        batch = run(torch.cat([others[:1], others[1:4], target, others[4:]]),
                    [[], [3, 4], drafts, [7]], [None, q_other, q, None],
                    [SAMPLED, SamplingParams(temperature=1.2), params, GREEDY], seeds=[1000 + s, 2000 + s, s, 3],
                    seeded=seeded)
        assert batch[2] == alone[s]
