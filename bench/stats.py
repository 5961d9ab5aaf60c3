"""Statistics of the benchmarks: percentiles and summaries of latency samples, and
speculative-decoding acceptance from per-request stats or from the difference of two ``/metrics``
scrapes."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from mtpserve.engine.errors import MtpserveError

SPEC_COUNTERS = {
    "mtpserve_spec_drafts_total": "num_drafts",
    "mtpserve_spec_draft_tokens_total": "num_draft_tokens",
    "mtpserve_spec_accepted_tokens_total": "num_accepted_tokens",
}
PER_POSITION = "mtpserve_spec_accepted_tokens_per_position_total"


def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between the two nearest ranks."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    rank = (len(xs) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(values) -> dict:
    """mean, p50 and p99 of ``values`` (all None when there are none)."""
    xs = list(values)
    if not xs:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99)}


def mean_std(values) -> dict:
    """Mean and sample standard deviation (0 for a single value) of repeated measurements."""
    xs = list(values)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "std": std, "runs": xs}


def side_by_side(ours: list[float], theirs: list[float], name: str) -> dict:
    """Paired runs of ours and a peer ``name``: each side's mean and spread, and of their ratio."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    return {"mtpserve": mean_std(ours), name: mean_std(theirs), "ratio": mean_std(ratios)}


def acceptance(num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int,
               accepted_per_position: list[int]) -> dict:
    """Acceptance from speculation counts. ``mean_acceptance_length`` counts tokens per verify step
    that carried drafts (1 + accepted / drafts, the bonus token included), ``per_position_rate[i]``
    the share of those steps whose draft at position i was accepted (non-increasing: a draft counts
    only when all before it did)."""
    return {
        "num_drafts": num_drafts,
        "num_draft_tokens": num_draft_tokens,
        "num_accepted_tokens": num_accepted_tokens,
        "acceptance_rate": num_accepted_tokens / num_draft_tokens if num_draft_tokens else 0.0,
        "mean_acceptance_length": 1 + num_accepted_tokens / num_drafts if num_drafts else 0.0,
        "accepted_per_position": list(accepted_per_position),
        "per_position_rate": [a / num_drafts for a in accepted_per_position] if num_drafts else [],
    }


def acceptance_of(stats) -> dict:
    """``acceptance`` of an engine SpecStats (per request or merged)."""
    return acceptance(stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens,
                      stats.accepted_per_position)


def spec_counters(exposition: str) -> dict | None:
    """The ``mtpserve_spec_*`` counters of a Prometheus text exposition, summed over their other
    labels: {"num_drafts", "num_draft_tokens", "num_accepted_tokens", "per_position": {position:
    count}}; None when the text has none of them (a server without our speculation metrics)."""
    counts = dict.fromkeys(SPEC_COUNTERS.values(), 0.0)
    per_position: dict[int, float] = {}
    found = False
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in SPEC_COUNTERS:
                counts[SPEC_COUNTERS[sample.name]] += sample.value
                found = True
            elif sample.name == PER_POSITION:
                position = int(sample.labels["position"])
                per_position[position] = per_position.get(position, 0.0) + sample.value
                found = True
    return {**counts, "per_position": per_position} if found else None


def spec_delta(before: dict, after: dict) -> dict:
    """``acceptance`` of what happened between two ``spec_counters`` scrapes."""
    def diff(name):
        return round(after[name] - before[name])

    positions = sorted(set(after["per_position"]) | set(before["per_position"]))
    per_position = [round(after["per_position"].get(p, 0.0) - before["per_position"].get(p, 0.0))
                    for p in range(positions[-1] + 1)] if positions else []
    if any(d < 0 for d in [diff(n) for n in SPEC_COUNTERS.values()] + per_position):
        raise MtpserveError("speculation counters went down between "
                            "scrapes (was the server restarted?)")
    return acceptance(diff("num_drafts"), diff("num_draft_tokens"), diff("num_accepted_tokens"),
                      per_position)
