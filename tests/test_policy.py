"""Adaptive draft length policy, without a model. Most tests price drafts with the acceptance rates alone
(``p_min=0.0``); the last ones add the confidence cut that adaptive drafting uses by default."""

import itertools
import random
from types import SimpleNamespace

from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.spec.policy import (
    DRAFT_P_MIN,
    PROBE_EVERY,
    SPEC_MARGIN,
    AcceptanceEstimate,
    DraftPolicy,
    StepCosts,
)

# a CPU-like cost curve: a step costs a fixed part plus a part per verified token; drafting is cheap
COSTS = StepCosts(main={(b, q): 1.0 + 0.12 * b * q for b in (1, 2, 4, 8, 16, 32, 64) for q in (1, 2, 4)},
                  draft={b: 0.05 + 0.01 * b for b in (1, 2, 4, 8, 16, 32, 64)})


REQUEST_IDS = itertools.count()
GREEDY = SamplingParams(temperature=0)


def request(policy: DraftPolicy, rate: float | None = None, n_max=None):
    """A request as the policy sees it (its id and limit), with ``policy``'s estimate of it set to ``rate``."""
    r = SimpleNamespace(request_id=f"r{next(REQUEST_IDS)}", spec_n_max=n_max, sampling_params=GREEDY)
    if rate is not None:
        set_rate(policy, r, rate)
    return r


def set_rate(policy: DraftPolicy, r, rate: float) -> None:
    est = policy.estimate(r.request_id)
    est.accepted, est.tried = rate * 1000, 1000.0


def expected_rate(costs: StepCosts, rates, drafts, batch_size) -> float:
    """Expected output tokens per second of one step, computed directly from the cost model; a plan that drafts
    must beat plain decoding by SPEC_MARGIN, so plain decoding's rate is scaled by it."""
    tokens = batch_size + sum(sum(a ** j for j in range(1, k + 1)) for a, k in zip(rates, drafts))
    depth_rows = [sum(k >= j for k in drafts) for j in range(1, max(drafts, default=0) + 1)]
    seconds = costs.step(batch_size, batch_size + sum(drafts)) + sum(costs.draft_step(r) for r in depth_rows)
    return tokens / seconds * (SPEC_MARGIN if not any(drafts) else 1.0)


def test_step_costs_interpolate_the_table():
    assert COSTS.step(8, 16) == COSTS.main[8, 2]
    assert COSTS.step(8, 24) == (COSTS.main[8, 2] + COSTS.main[8, 4]) / 2
    assert COSTS.step(12, 12) == (COSTS.main[8, 1] + COSTS.main[16, 1]) / 2
    assert abs(COSTS.step(128, 128) - (1.0 + 0.12 * 128)) < 1e-9  # the last piece extended
    assert COSTS.draft_step(0) == 0.0


def test_k_follows_acceptance():
    policy = DraftPolicy(4, costs=COSTS, p_min=0.0)
    ks = [policy.plan([request(policy, rate)], 1)[0] for rate in (0.05, 0.5, 0.8, 0.95)]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == 4


def test_backs_off_for_large_batches():
    policy = DraftPolicy(4, costs=COSTS, p_min=0.0)
    assert policy.plan([request(policy, 0.7)], 1)[0] > 0
    assert policy.plan([request(policy, 0.7) for _ in range(32)], 32) == [0] * 32  # verifying costs more than it saves


def test_one_plan_for_the_batch():
    """In one batch, requests whose drafts miss draft less than those whose drafts land."""
    policy = DraftPolicy(3, costs=COSTS, p_min=0.0)
    reqs = [request(policy, rate) for rate in (0.9, 0.1, 0.9, 0.5)]
    plan = policy.plan(reqs, 4)
    assert plan[0] == plan[2] >= plan[3] >= plan[1] and plan[0] > plan[1]
    # requests that cannot draft still count in the batch: the same four drafters in a batch of 64 draft less
    assert sum(policy.plan([request(policy, rate) for rate in (0.9, 0.1, 0.9, 0.5)], 64)) < sum(plan)


def test_allocation_is_near_the_best_plan():
    """Against every possible plan of a small batch, scored by the cost model itself."""
    policy = DraftPolicy(3, costs=COSTS, p_min=0.0)
    rng = random.Random(0)
    for _ in range(40):
        batch = rng.choice([1, 2, 3, 5, 9])
        rates = [rng.random() for _ in range(min(batch, 3))]
        plan = policy.allocate(rates, [3] * len(rates), batch)
        best = max(expected_rate(COSTS, rates, list(p), batch) for p in itertools.product(range(4), repeat=len(rates)))
        assert expected_rate(COSTS, rates, plan, batch) >= 0.99 * best


def test_fixed_and_per_request_limits():
    policy = DraftPolicy(3, adaptive=False, costs=COSTS)
    assert policy.plan([request(policy, 0.0)], 64) == [3]
    policy = DraftPolicy(3, costs=COSTS, p_min=0.0)
    assert policy.plan([request(policy, 0.99, n_max=1), request(policy, 0.99, n_max=0)], 2) == [1, 0]


def test_estimate_and_probes():
    est = AcceptanceEstimate()
    for _ in range(30):
        est.observe(3, 3)
    assert est.rate > 0.9
    for _ in range(60):
        est.observe(3, 0)
    assert est.rate < 0.1
    policy = DraftPolicy(3, costs=COSTS, p_min=0.0)
    req = request(policy, 0.0)
    ks = [policy.plan([req], 1)[0] for _ in range(PROBE_EVERY)]
    assert ks == [0] * (PROBE_EVERY - 1) + [1]  # one probe
    policy.observe_acceptance(req.request_id, 1, 0)  # rejected: the next probe waits twice as long
    ks = [policy.plan([req], 1)[0] for _ in range(2 * PROBE_EVERY)]
    assert ks.count(1) == 1 and ks[-1] == 1


def test_probes_only_where_drafting_could_pay():
    """A batch that drafts nothing still probes, so a predictable batch can find out that it is; a batch in
    which even very predictable text would not pay for drafting does not."""
    policy = DraftPolicy(3, costs=COSTS, p_min=0.0)
    reqs = [request(policy, 0.3) for _ in range(8)]
    plans = [policy.plan(reqs, 8) for _ in range(PROBE_EVERY)]
    assert all(k == 0 for plan in plans[:-1] for k in plan) and plans[-1] == [1] * 8
    reqs = [request(policy, 0.3) for _ in range(32)]
    assert all(policy.plan(reqs, 32) == [0] * 32 for _ in range(3 * PROBE_EVERY))


def step_seconds(batch_size, num_tokens, next_drafts, spec_scale):
    """A machine on which speculation costs ``spec_scale`` times what COSTS says, and plain steps what it says."""
    plain = COSTS.step(batch_size, batch_size)
    depth_rows = [sum(k >= j for k in next_drafts) for j in range(1, max(next_drafts, default=0) + 1)]
    extra = COSTS.step(batch_size, num_tokens) - plain + sum(COSTS.draft_step(r) for r in depth_rows)
    return plain + spec_scale * extra


def test_measured_steps_reprice_speculation():
    policy = DraftPolicy(3, costs=COSTS, p_min=0.0)
    reqs = [request(policy, 0.8) for _ in range(8)]
    assert sum(policy.plan(reqs, 8)) > 0  # by the start-up timings drafting pays at 8
    assert policy.fit.scale(8) == 1.0
    for _ in range(100):  # the steps actually run: speculation costs three times its calibrated price
        plan = policy.plan(reqs, 8)
        for r in reqs:  # keep the estimates where they were
            set_rate(policy, r, 0.8)
        drafts = [max(k, 1) for k in plan]
        policy.observe(8, 8 + sum(drafts), drafts, step_seconds(8, 8 + sum(drafts), drafts, 3.0))
    assert abs(policy.fit.scale(8) - 3.0) < 0.15
    assert policy.plan(reqs, 8) == [0] * 8
    assert sum(policy.plan(reqs[:1], 1)) > 0  # other batch sizes keep their own fit


def test_plain_steps_leave_the_price_of_speculation_alone():
    policy = DraftPolicy(3, costs=COSTS, p_min=0.0)
    for _ in range(50):
        policy.observe(4, 4, [], 2 * COSTS.step(4, 4))  # a slow machine, no drafting
    assert policy.fit.scale(4) == 1.0


def test_near_ties_go_to_plain_decoding():
    """At batch 1 a draft accepted a quarter of the time is worth about 7% by the cost model: not enough."""
    policy = DraftPolicy(1, costs=COSTS, p_min=0.0)
    gain = lambda a: (1 + a) / (COSTS.step(1, 2) + COSTS.draft_step(1)) * COSTS.step(1, 1)  # noqa: E731
    assert 1.0 < gain(0.25) < SPEC_MARGIN
    assert policy.plan([request(policy, 0.25)], 1) == [0]
    assert policy.plan([request(policy, 0.5)], 1) == [1]


def test_cheap_later_draft_steps_draft_deeper():
    """Greedy drafts that run in one kernel call pay a full draft step for their first draft only: priced so,
    a request drafts deeper, and the plan is still the best one by that cost model."""
    costs = StepCosts(main=COSTS.main, draft={b: 0.4 + 0.01 * b for b in (1, 2, 4, 8)},
                      fused={b: 0.02 + 0.01 * b for b in (1, 2, 4, 8)})
    assert costs.draft_step(1, 1, fused=True) == costs.draft_step(1) > costs.draft_step(1, 2, fused=True)
    assert costs.draft_step(1, 2, fused=False) == costs.draft_step(1)
    policy = DraftPolicy(4, costs=costs, p_min=0.0)
    per_step = policy.allocate([0.7], [4], 1)
    one_call = policy.allocate([0.7], [4], 1, fused=True)
    assert one_call[0] > per_step[0]

    def rate(k: int) -> float:  # tokens per second of k drafts, from the cost model directly
        seconds = costs.step(1, 1 + k) + sum(costs.draft_step(1, depth, fused=True) for depth in range(1, k + 1))
        return sum(0.7 ** j for j in range(k + 1)) / seconds * (SPEC_MARGIN if k == 0 else 1.0)

    assert rate(one_call[0]) == max(rate(k) for k in range(5))


def test_confidence_cut_is_on_by_default_when_adaptive_and_explicit_anywhere():
    assert DraftPolicy(3).p_min == DRAFT_P_MIN > 0
    assert DraftPolicy(3, adaptive=False).p_min == 0.0  # a fixed k drafts exactly k
    assert DraftPolicy(3, adaptive=False, p_min=0.4).p_min == 0.4
    assert DraftPolicy(3, p_min=0.0).p_min == 0.0


def test_with_the_cut_a_greedy_request_that_drafts_plans_its_limit():
    """The cut, not the mean rate, sets how far a greedy chain goes: a request the rates let draft plans its whole
    limit, one they do not plans none, a sampled one keeps the rates' length, and a large batch still drafts
    nothing."""
    policy = DraftPolicy(4, costs=COSTS)
    rate_only = DraftPolicy(4, costs=COSTS, p_min=0.0)
    for rate in (0.05, 0.5, 0.8):
        r = request(policy, rate)
        set_rate(rate_only, r, rate)
        planned = rate_only.plan([r], 1)[0]
        assert policy.plan([r], 1)[0] == (4 if planned else 0)
    assert rate_only.plan([request(rate_only, 0.5)], 1)[0] < 4  # so the cut's plan differs somewhere
    assert policy.plan([request(policy, 0.7) for _ in range(32)], 32) == [0] * 32
    assert policy.plan([request(policy, 0.7, n_max=2)], 1) == [2]
    sampled = request(policy, 0.5)
    sampled.sampling_params = SamplingParams(temperature=0.7)
    set_rate(rate_only, sampled, 0.5)
    assert policy.plan([sampled], 1) == rate_only.plan([sampled], 1)


def test_a_chain_cut_before_its_first_draft_counts_as_a_miss():
    """Text the head cannot predict (every chain cut at once) stops drafting, MTP pass and all."""
    policy = DraftPolicy(3, costs=COSTS)
    r = request(policy)
    assert policy.plan([r], 1)[0] == 3
    before = policy.estimate(r.request_id).rate
    policy.observe_cut(r.request_id)
    assert policy.estimate(r.request_id).rate < before
    for _ in range(30):
        policy.observe_cut(r.request_id)
    assert policy.plan([r], 1)[0] == 0
