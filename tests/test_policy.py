"""Adaptive draft length policy, without a model."""

from types import SimpleNamespace

from mtpserve.engine.spec.policy import PROBE_EVERY, AcceptanceEstimate, DraftPolicy, StepCosts

# a CPU-like cost curve: verifying more tokens costs more, drafting is cheap
COSTS = StepCosts(main={1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0, 16: 3.5, 32: 6.5, 64: 12.5},
                  draft={1: 0.08, 2: 0.1, 4: 0.12, 8: 0.2, 16: 0.35, 32: 0.6, 64: 1.2})


def request(rate: float | None = None, n_max=None):
    est = AcceptanceEstimate()
    if rate is not None:
        est.accepted, est.tried = rate * 1000, 1000.0
    return SimpleNamespace(acceptance=est, spec_n_max=n_max)


def test_k_follows_acceptance():
    policy = DraftPolicy(4, costs=COSTS)
    ks = [policy(request(rate), 1) for rate in (0.05, 0.5, 0.8, 0.95)]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == 4


def test_backs_off_for_large_batches():
    policy = DraftPolicy(4, costs=COSTS)
    assert policy(request(0.7), 1) > 0
    assert policy(request(0.7), 32) == 0  # verifying 64+ tokens costs more than it saves


def test_fixed_and_per_request_limits():
    assert DraftPolicy(3, adaptive=False, costs=COSTS)(request(0.0), 64) == 3
    assert DraftPolicy(3, costs=COSTS)(request(0.99, n_max=1), 1) == 1
    assert DraftPolicy(3, costs=COSTS)(request(0.99, n_max=0), 1) == 0


def test_estimate_and_probes():
    est = AcceptanceEstimate()
    for _ in range(30):
        est.observe(3, 3)
    assert est.rate > 0.9
    for _ in range(60):
        est.observe(3, 0)
    assert est.rate < 0.1
    policy = DraftPolicy(3, costs=COSTS)
    req = request(0.0)
    ks = [policy(req, 1) for _ in range(PROBE_EVERY)]
    assert ks == [0] * (PROBE_EVERY - 1) + [1]  # one probe
    req.acceptance.observe(1, 0)  # rejected: the next probe waits twice as long
    ks = [policy(req, 1) for _ in range(2 * PROBE_EVERY)]
    assert ks.count(1) == 1 and ks[-1] == 1
