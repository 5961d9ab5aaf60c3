"""The periodic progress line while the engine is busy: running/waiting, generation speed since the
previous line, mean acceptance length and per-position acceptance. Counts only, never request
content."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class BusyLog:
    """Fed from the engine thread after every step;
    logs at INFO at most every ``interval`` seconds."""

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self.last_time = time.perf_counter()
        # request id -> (steps, drafts, accepted, accepted per position) already counted
        self.seen: dict[str, tuple[int, int, int, list[int]]] = {}
        self._reset()

    def _reset(self) -> None:
        self.tokens = 0
        self.steps = 0          # verify steps that emitted tokens (with or without drafts)
        self.accepted = 0
        self.drafts = 0         # verify steps that carried drafts
        self.per_position: list[int] = []

    def observe(self, outputs) -> None:
        for out in outputs:
            self.tokens += len(out.new_token_ids)
            stats = out.spec_stats
            steps, drafts, accepted, per_position = self.seen.get(out.request_id, (0, 0, 0, []))
            self.steps += stats.num_steps - steps
            self.drafts += stats.num_drafts - drafts
            self.accepted += stats.num_accepted_tokens - accepted
            now_positions = list(stats.accepted_per_position)
            for i, count in enumerate(now_positions):
                if i >= len(self.per_position):
                    self.per_position.append(0)
                before = per_position[i] if i < len(per_position) else 0
                self.per_position[i] += count - before
            if out.finished:
                self.seen.pop(out.request_id, None)
            else:
                self.seen[out.request_id] = (stats.num_steps, stats.num_drafts,
                                             stats.num_accepted_tokens, now_positions)

    def forget(self, request_id: str) -> None:
        self.seen.pop(request_id, None)

    def line(self, running: int, waiting: int, elapsed: float) -> str:
        speed = self.tokens / elapsed if elapsed > 0 else 0.0
        mean_len = (self.steps + self.accepted) / self.steps if self.steps else 0.0
        positions = ""
        if self.drafts:
            positions = ", ".join(f"{c / self.drafts:.2f}" for c in self.per_position)
        return (f"running {running}, waiting {waiting}, generation {speed:.1f} tok/s, "
                f"mean acceptance length {mean_len:.2f}, acceptance per position [{positions}]")

    def maybe_log(self, running: int, waiting: int) -> bool:
        """Log a line when ``interval`` has passed and there
        was work since the last one; True if logged."""
        now = time.perf_counter()
        elapsed = now - self.last_time
        if self.interval <= 0 or elapsed < self.interval:
            return False
        busy = self.tokens or running or waiting
        if busy:
            logger.info("%s", self.line(running, waiting, elapsed))
        self.last_time = now
        self._reset()
        return bool(busy)
