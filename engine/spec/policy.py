"""Adaptive draft length.

Each request keeps a decayed count of accepted vs. tried drafts, giving a per-token acceptance
estimate ``a``. With ``k`` drafts a verify step emits on average ``E(k) = 1 + a + ... + a^k`` tokens
(accepted prefix + bonus) and costs ``C(k) = T(B(k+1)) + k * D(B)`` for a batch of ``B`` requests,
where ``T(n)`` is the measured time of a main-model step over ``n`` tokens and ``D(b)`` that of one
draft step over ``b`` requests (both measured when the engine starts). The policy picks the ``k``
in ``[0, n_max]`` with the most tokens per second, ``E(k) / C(k)`` against ``1 / T(B)`` for plain
decoding, so speculation backs off by itself when the batch is large enough that verifying costs
more than it saves, or when a request's drafts keep missing. A request at ``k = 0`` drafts one
token after ``PROBE_EVERY`` steps so its estimate can recover; each probe that is rejected doubles
that wait (up to ``PROBE_MAX``), an accepted one resets it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

DECAY = 0.9
PRIOR_ACCEPTED, PRIOR_TRIED = 1.0, 2.0  # a = 0.5 before any observation
PROBE_EVERY = 8
PROBE_MAX = 128


@dataclass
class StepCosts:
    """Measured seconds: ``main[n]`` for a main-model step over n tokens, ``draft[b]`` for a draft step of b rows."""

    main: dict[int, float] = field(default_factory=lambda: {1: 1.0})
    draft: dict[int, float] = field(default_factory=lambda: {1: 0.0})

    @staticmethod
    def _interp(table: dict[int, float], n: int) -> float:
        keys = sorted(table)
        if n <= keys[0]:
            return table[keys[0]] * n / keys[0] if keys[0] > 1 else table[keys[0]]
        if n >= keys[-1]:
            return table[keys[-1]] * n / keys[-1]
        i = bisect.bisect_left(keys, n)
        lo, hi = keys[i - 1], keys[i]
        return table[lo] + (table[hi] - table[lo]) * (n - lo) / (hi - lo)

    def step(self, num_tokens: int) -> float:
        return self._interp(self.main, num_tokens)

    def draft_step(self, rows: int) -> float:
        return self._interp(self.draft, rows)


@dataclass
class AcceptanceEstimate:
    accepted: float = PRIOR_ACCEPTED
    tried: float = PRIOR_TRIED
    steps_without_drafts: int = 0
    probe_wait: int = PROBE_EVERY

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            return
        self.probe_wait = PROBE_EVERY if num_accepted else min(2 * self.probe_wait, PROBE_MAX)
        rejected = 1 if num_accepted < num_drafts else 0
        self.accepted = DECAY * self.accepted + num_accepted
        self.tried = DECAY * self.tried + num_accepted + rejected

    @property
    def rate(self) -> float:
        return self.accepted / self.tried


class DraftPolicy:
    def __init__(self, n_max: int, adaptive: bool = True, costs: StepCosts | None = None):
        self.n_max = n_max
        self.adaptive = adaptive
        self.costs = costs or StepCosts()

    def limit(self, request) -> int:
        return self.n_max if request.spec_n_max is None else request.spec_n_max

    def best_k(self, rate: float, n_max: int, batch_size: int) -> int:
        c = self.costs
        best_k, best = 0, 1.0 / c.step(batch_size)
        expected = 1.0
        for k in range(1, n_max + 1):
            expected += rate ** k
            cost = c.step(batch_size * (k + 1)) + k * c.draft_step(batch_size)
            if expected / cost > best * 1.0001:
                best_k, best = k, expected / cost
        return best_k

    def __call__(self, request, batch_size: int) -> int:
        """Drafts to propose for ``request``'s next step."""
        n_max = self.limit(request)
        if not self.adaptive or n_max == 0:
            return n_max
        est = request.acceptance
        k = self.best_k(est.rate, n_max, batch_size)
        if k == 0:
            est.steps_without_drafts += 1
            if est.steps_without_drafts >= est.probe_wait:
                est.steps_without_drafts = 0
                return 1
        return k
