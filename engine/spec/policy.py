"""Adaptive draft length, chosen for the whole batch.

Each request keeps a decayed count of accepted vs. tried drafts, giving a per-token acceptance
estimate ``a``; its j-th draft is accepted with probability about ``a^j``. A step over ``B``
requests that verify ``n`` tokens in all, with ``r_j`` requests drafting a j-th token, costs
``C = T(B, n) + sum_j D(r_j)``, where ``T`` is the measured time of a verify step (main model,
logits and verification; ``n = B`` is plain decoding) and ``D(r)`` that of one draft step over ``r``
requests, both measured when the engine starts (``calibrate.py``). Drafts that run in one kernel
call (kernels/cpu_draft.py) price their later steps at what a step of that loop costs.

The policy starts from plain decoding (``B`` tokens per ``T(B, B)``) and adds drafts across the
batch in order of their expected acceptance ``a_i^j``, keeping the number of drafts that gives the
most tokens per second ``(B + sum of a_i^j) / C``, provided that beats plain decoding by
``SPEC_MARGIN`` (drafting has costs no step shows: requests that draft well finish early and leave a
smaller, less efficient batch behind). So a batch too large for verification to pay off drafts
nothing, a request whose drafts keep missing drafts less than its neighbours, and one step never
pays the verify and draft overhead for a few unlikely drafts. ``StepFit`` reprices speculation from
the steps actually run, so the plan follows this machine, not only its start-up timings.

A request that has drafted nothing for ``PROBE_EVERY`` steps drafts one token (a probe) if drafting
would pay for it at an acceptance of ``PROBE_RATE``, so its estimate follows the text even while the
batch is not drafting (a batch whose requests turn out predictable starts drafting), but a batch in
which no text could make drafting pay does not probe at all. Each rejected probe doubles that wait
(up to ``PROBE_MAX``), an accepted one resets it. A probe costs one verified token and the MTP pass
over the positions the request skipped while not drafting.

Adaptive drafting also cuts each chain at the head's confidence (``p_min``, ``DRAFT_P_MIN`` unless
given): the proposer stops a request's drafts where the product of their top probabilities falls
below it. A greedy request that drafts at all then plans its whole limit and leaves the length to
the cut; a chain cut before its first draft counts as one missed draft (``observe_cut``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

DECAY = 0.9
PRIOR_ACCEPTED, PRIOR_TRIED = 1.0, 2.0  # a = 0.5 before any observation
PROBE_EVERY = 8
PROBE_MAX = 128
PROBE_RATE = 0.9  # a probe is due only where drafting would pay at this acceptance
# drafting is planned only when it is expected this much faster than plain decoding
SPEC_MARGIN = 1.1
# the confidence cut of adaptive drafting (docs/BENCHMARKS.md, "Results: the confidence cut")
DRAFT_P_MIN = 0.25
FIT_DECAY = 0.98  # StepFit: weight of a measured step after 1, 2, ... newer ones
FIT_PRIOR = 2.0  # StepFit: the calibration counts as this many steps ...
PRIOR_X2 = 0.25  # ... each with speculation priced at half a plain step (x = 0.5)


def _interp(table: dict[int, float], x: float) -> float:
    """Piecewise linear in x (the last piece extended beyond the largest key), clamped below
    the smallest."""
    keys = sorted(table)
    if x <= keys[0]:
        return table[keys[0]]
    if len(keys) == 1:
        return table[keys[0]] * x / keys[0]
    i = min(bisect.bisect_left(keys, x), len(keys) - 1)
    lo, hi = keys[i - 1], keys[i]
    return table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)


@dataclass
class StepCosts:
    """Measured seconds: ``main[(b, q)]`` for a step of b requests with q tokens each (main model,
    logits, sampling or verification), ``draft[b]`` for one draft step over b requests, and
    ``fused_first[b]`` and ``fused[b]`` for the first and a later draft step of the loop that
    runs in one kernel call (kernels/cpu_draft.py; empty where there is none)."""

    main: dict[tuple[int, int], float] = field(default_factory=lambda: {(1, 1): 1.0})
    draft: dict[int, float] = field(default_factory=lambda: {1: 0.0})
    fused_first: dict[int, float] = field(default_factory=dict)
    fused: dict[int, float] = field(default_factory=dict)

    def at_batch(self, batch_size: int) -> dict[int, float]:
        """Step seconds by tokens per request, for a batch of ``batch_size`` requests."""
        by_tokens: dict[int, dict[int, float]] = {}
        for (b, q), t in self.main.items():
            by_tokens.setdefault(q, {})[b] = t
        return {q: _interp(by_batch, batch_size) for q, by_batch in by_tokens.items()}

    def step(self, batch_size: int, num_tokens: int) -> float:
        """A step of ``batch_size`` requests verifying ``num_tokens`` tokens in all."""
        return _interp(self.at_batch(batch_size), num_tokens / batch_size)

    def draft_step(self, rows: int, depth: int = 1, fused: bool = False) -> float:
        """Draft step ``depth`` (1: the first) over ``rows`` requests; ``fused``: the requests'
        drafts run in one kernel call."""
        if not rows:
            return 0.0
        if fused and depth > 1 and self.fused:
            return _interp(self.fused, rows)
        if fused and self.fused_first:
            return _interp(self.fused_first, rows)
        return _interp(self.draft, rows)


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


class StepFit:
    """Corrects the start-up price of speculation with the steps the engine actually runs.

    Per batch-size bucket (1, 2, 3-4, 5-8, ...) it fits ``measured = P + b * X`` over pure decode
    steps, where ``P = T(B, B)`` is the calibrated plain step and ``X`` the calibrated price of the
    step's speculation (its extra verified tokens and its draft steps). ``b`` starts at 1 and
    follows exponentially weighted least squares, drawn towards 1 by ``FIT_PRIOR`` virtual steps.
    Step times depend on the machine, not on the text, so every drafting step informs the fit,
    probes included, and whatever the calibration missed (verify and sampling overhead, longer
    contexts, the MTP pass over positions skipped while not drafting) is priced in. ``P`` itself is
    not refitted: a running batch that drafts has no plain steps to fit it with, and any slowdown of
    the whole step lands on ``b``, which errs towards drafting less.
    """

    def __init__(self):
        # bucket -> weighted sums of x * (y - 1) and x^2 (y, x over P)
        self.sums: dict[int, list[float]] = {}

    def observe(self, batch_size: int, plain: float, extra: float, seconds: float) -> None:
        s = self.sums.setdefault(batch_size.bit_length(), [0.0, 0.0])
        x, y = extra / plain, seconds / plain
        s[0] = FIT_DECAY * s[0] + x * (y - 1)
        s[1] = FIT_DECAY * s[1] + x * x

    def scale(self, batch_size: int) -> float:
        """``b`` for a batch of ``batch_size``: what speculation costs, over what the
        calibration says."""
        s = self.sums.get(batch_size.bit_length())
        if s is None:
            return 1.0
        return max((s[0] + FIT_PRIOR * PRIOR_X2) / (s[1] + FIT_PRIOR * PRIOR_X2), 0.1)


class DraftPolicy:
    def __init__(self, n_max: int, adaptive: bool = True, costs: StepCosts | None = None,
                 p_min: float | None = None):
        """``p_min``: the confidence cut (None: DRAFT_P_MIN when adaptive, else off)."""
        self.n_max = n_max
        self.adaptive = adaptive
        self.costs = costs or StepCosts()
        self.fit = StepFit()
        self.estimates: dict[str, AcceptanceEstimate] = {}  # per request id
        self.explicit_p_min = p_min

    @property
    def p_min(self) -> float:
        """Where a request's drafts stop: the head's confidence that they are all accepted."""
        if self.explicit_p_min is not None:
            return self.explicit_p_min
        if self.adaptive:
            return DRAFT_P_MIN
        return 0.0

    def limit(self, request) -> int:
        return self.n_max if request.spec_n_max is None else request.spec_n_max

    def estimate(self, request_id: str) -> AcceptanceEstimate:
        estimate = self.estimates.get(request_id)
        if estimate is None:
            estimate = self.estimates[request_id] = AcceptanceEstimate()
        return estimate

    def observe_acceptance(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        self.estimate(request_id).observe(num_drafts, num_accepted)

    def observe_cut(self, request_id: str) -> None:
        """A request planned drafts but the confidence cut left none: counted as one rejected
        draft, so text the head cannot predict stops drafting (and its MTP pass) altogether."""
        self.estimate(request_id).observe(1, 0)

    def free(self, request_id: str) -> None:
        self.estimates.pop(request_id, None)

    def allocate(self, rates: list[float], limits: list[int], batch_size: int,
                 fused: bool = False) -> list[int]:
        """Drafts per request that maximise the batch's expected tokens per second; ``batch_size``
        counts every request in the step, those that cannot draft included; ``fused``: their
        drafts run in one kernel call."""
        row = self.costs.at_batch(batch_size)
        plain = _interp(row, 1.0)
        b = self.fit.scale(batch_size)
        draft_cost: dict[tuple[int, bool], float] = {}

        def cost(num_tokens: int, depth_rows: list[int]) -> float:
            drafting = 0.0
            for depth, r in enumerate(depth_rows):
                key = (r, depth > 1)
                if key not in draft_cost:
                    draft_cost[key] = self.costs.draft_step(r, depth, fused)
                drafting += draft_cost[key]
            extra = _interp(row, num_tokens / batch_size) - plain + drafting
            return plain + b * extra

        candidates = []  # (expected acceptance of request i's j-th draft, -j, i)
        for i, (rate, n) in enumerate(zip(rates, limits)):
            for j in range(1, n + 1):
                candidates.append((rate ** j, -j, i))
        # most likely drafts first; a request's j-th draft after its (j-1)-th
        candidates.sort(reverse=True)
        depth_rows = [0] * (max(limits, default=0) + 1)
        tokens, num_tokens = float(batch_size), batch_size
        best, best_count = SPEC_MARGIN * tokens / cost(num_tokens, depth_rows), 0
        for count, (gain, neg_j, _) in enumerate(candidates, 1):
            tokens += gain
            num_tokens += 1
            depth_rows[-neg_j] += 1
            rate = tokens / cost(num_tokens, depth_rows)
            if rate > best * 1.0001:
                best, best_count = rate, count
        drafts = [0] * len(rates)
        for _, _, i in candidates[:best_count]:
            drafts[i] += 1
        return drafts

    @staticmethod
    def _lengthen_greedy_chains(requests: list, drafts: list[int], limits: list[int]) -> list[int]:
        """With the confidence cut, a greedy request that drafts at all plans its whole limit: the
        head's confidence in its argmax is close to the chance it is accepted (docs/BENCHMARKS.md,
        "Results: the confidence cut"), so the cut, not the mean rate, says how far a chain should go. A sampled
        request keeps the rates' length: its draft is any token of q, and q's top probability says
        less of whether the target accepts it."""
        out = []
        for r, k, limit in zip(requests, drafts, limits):
            if k and r.sampling_params.greedy:
                k = limit
            out.append(k)
        return out

    def plan(self, requests: list, batch_size: int, fused: bool = False) -> list[int]:
        """Drafts to propose for each of ``requests``' next step (a batch of ``batch_size``);
        ``fused``: their drafts run in one kernel call."""
        limits = [self.limit(r) for r in requests]
        if not self.adaptive:
            return limits
        estimates = [self.estimate(r.request_id) for r in requests]
        rates = [est.rate for est in estimates]
        drafts = self.allocate(rates, limits, batch_size, fused)
        if self.p_min > 0:
            drafts = self._lengthen_greedy_chains(requests, drafts, limits)
        due = []
        for i, est in enumerate(estimates):
            if drafts[i] or not limits[i]:
                est.steps_without_drafts = 0
                continue
            est.steps_without_drafts += 1
            if est.steps_without_drafts >= est.probe_wait:
                due.append(i)
        if due:  # probe where drafting would pay if the text turned predictable
            probe_rates = [PROBE_RATE if i in due else a for i, a in enumerate(rates)]
            hopeful = self.allocate(probe_rates, limits, batch_size, fused)
            for i in due:
                if hopeful[i]:
                    estimates[i].steps_without_drafts = 0
                    drafts[i] = 1
        return drafts

    def observe(self, batch_size: int, num_tokens: int, next_drafts: list[int],
                seconds: float, fused: bool = False) -> None:
        """A pure decode step over ``num_tokens`` tokens (drafts included) took ``seconds``,
        drafting ``next_drafts`` tokens per request for the next step included (``fused``: in one
        kernel call)."""
        if not (self.adaptive and self.n_max) or seconds <= 0:
            return
        row = self.costs.at_batch(batch_size)
        plain = _interp(row, 1.0)
        drafting = 0.0
        for depth in range(1, max(next_drafts, default=0) + 1):
            rows = sum(k >= depth for k in next_drafts)
            drafting += self.costs.draft_step(rows, depth, fused)
        extra = _interp(row, num_tokens / batch_size) - plain + drafting
        self.fit.observe(batch_size, plain, extra, seconds)
