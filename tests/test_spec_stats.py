"""SpecStats: counting, merging and the metrics block field names."""

import pytest

from mtpserve.engine.spec.stats import SpecStats


def test_observe_counts():
    stats = SpecStats()
    for drafted, accepted in [(3, 3), (3, 1), (0, 0), (2, 0), (3, 2)]:
        stats.observe(drafted, accepted)
    assert stats.num_steps == 5
    assert stats.num_drafts == 4
    assert stats.num_draft_tokens == 11
    assert stats.num_accepted_tokens == 6
    assert stats.accepted_per_position == [3, 2, 1]
    assert stats.acceptance_rate == pytest.approx(6 / 11)
    assert stats.mean_acceptance_length == pytest.approx((6 + 5) / 5)


def test_positions_drafted_but_never_accepted_are_listed():
    stats = SpecStats()
    stats.observe(4, 1)
    assert stats.accepted_per_position == [1, 0, 0, 0]


def test_empty_stats():
    stats = SpecStats()
    assert stats.acceptance_rate == 0.0
    assert stats.mean_acceptance_length == 0.0
    stats.observe(0, 0)
    assert stats.acceptance_rate == 0.0
    assert stats.mean_acceptance_length == 1.0
    assert stats.num_drafts == 0 and stats.accepted_per_position == []


def test_observe_rejects_impossible_counts():
    with pytest.raises(ValueError):
        SpecStats().observe(2, 3)
    with pytest.raises(ValueError):
        SpecStats().observe(2, -1)


def test_merge_equals_observing_everything_in_one():
    steps_a = [(3, 3), (1, 0), (0, 0)]
    steps_b = [(5, 4), (2, 2)]
    a, b, together = SpecStats(), SpecStats(), SpecStats()
    for drafted, accepted in steps_a:
        a.observe(drafted, accepted)
        together.observe(drafted, accepted)
    for drafted, accepted in steps_b:
        b.observe(drafted, accepted)
        together.observe(drafted, accepted)
    total = SpecStats()
    total.merge(a)
    total.merge(b)
    assert total == together
    assert total.accepted_per_position == [3, 3, 2, 1, 0]
    counts = total.accepted_per_position
    assert all(x >= y for x, y in zip(counts, counts[1:]))
    assert a.accepted_per_position == [1, 1, 1]  # merge does not touch its argument's list


def test_to_dict_fields():
    stats = SpecStats()
    stats.observe(2, 1)
    stats.observe(2, 2)
    block = stats.to_dict()
    assert set(block) == {"num_draft_tokens", "num_accepted_tokens", "acceptance_rate",
                          "mean_acceptance_length", "num_steps", "accepted_per_position", "num_drafts"}
    assert block == {"num_draft_tokens": 4, "num_accepted_tokens": 3, "acceptance_rate": 0.75,
                     "mean_acceptance_length": 2.5, "num_steps": 2, "accepted_per_position": [2, 1],
                     "num_drafts": 2}
    block["accepted_per_position"].append(7)
    assert stats.accepted_per_position == [2, 1]
    assert SpecStats().to_dict()["acceptance_rate"] == 0.0
