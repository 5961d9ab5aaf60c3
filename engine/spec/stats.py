"""Speculative decoding statistics, per request and aggregated (the "speculative" metrics block)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    num_drafts: int = 0            # verify steps that carried >= 1 draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_steps: int = 0             # decode steps that emitted tokens, steps without drafts included
    # accepted_per_position[i]: times the draft at position i was accepted; one entry per position
    # ever drafted, so trailing zeros show positions drafted but never accepted. Non-increasing,
    # since a draft is only accepted when all drafts before it were.
    accepted_per_position: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        """Record one step that verified `num_draft_tokens` drafts and accepted the
        first `num_accepted`."""
        if not 0 <= num_accepted <= num_draft_tokens:
            raise ValueError(f"accepted {num_accepted} of {num_draft_tokens} draft tokens")
        self.num_steps += 1
        if num_draft_tokens == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        self._extend(num_draft_tokens)
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1

    def copy(self) -> SpecStats:
        return SpecStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                         self.num_steps, list(self.accepted_per_position))

    def merge(self, other: SpecStats) -> None:
        """Add `other`'s counts into this one."""
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.num_steps += other.num_steps
        self._extend(len(other.accepted_per_position))
        for position, count in enumerate(other.accepted_per_position):
            self.accepted_per_position[position] += count

    def _extend(self, length: int) -> None:
        missing = length - len(self.accepted_per_position)
        if missing > 0:
            self.accepted_per_position.extend([0] * missing)

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / draft tokens (0 without drafts)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per step, accepted drafts plus the one recovered or bonus token:
        (num_accepted_tokens + num_steps) / num_steps (0 without steps). 1.0 means no speedup."""
        if not self.num_steps:
            return 0.0
        return (self.num_accepted_tokens + self.num_steps) / self.num_steps

    def to_dict(self) -> dict:
        """The "speculative" block of a response's metrics, plus num_drafts."""
        return {
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
            "num_steps": self.num_steps,
            "accepted_per_position": list(self.accepted_per_position),
            "num_drafts": self.num_drafts,
        }
