"""Per-request sampling settings (the engine-side twin of the OpenAI request fields)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mtpserve.engine.errors import RequestError

GREEDY_EPS = 1e-5


def _is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 or -1 = disabled
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0   # HF semantics, applied over prompt + output tokens
    presence_penalty: float = 0.0     # OpenAI semantics, output tokens only
    frequency_penalty: float = 0.0    # OpenAI semantics, output tokens only
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)   # stop strings, checked on text elsewhere
    logprobs: int | None = None       # number of top logprobs to return (0 = chosen token only)
    min_tokens: int = 0               # before this many outputs: no EOS or stop token, no stop string
    include_stop_str_in_output: bool = False  # keep the stop string or stop token's text
    skip_special_tokens: bool = True  # special tokens' text left out of the output text
    grammar: object | None = None     # a grammar.Grammar the output follows (structured output)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def validate(self) -> None:
        """Raise RequestError(param=<field>) for the first invalid field."""
        def bad(param: str, message: str) -> None:
            raise RequestError(message, code="invalid_request", param=param)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                bad(name, f"{name} must be a finite number, got {value!r}")
        for name in ("max_tokens", "top_k"):
            value = getattr(self, name)
            if not _is_int(value):
                bad(name, f"{name} must be an integer, got {value!r}")

        if self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"min_tokens must be an integer in [0, max_tokens], "
                              f"got {self.min_tokens!r}")
        if self.temperature < 0:
            bad("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad("top_k", f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty",
                f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                bad(name, f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", f"seed must be an integer, got {self.seed!r}")
        for token_id in self.stop_token_ids:
            if not _is_int(token_id) or token_id < 0:
                bad("stop_token_ids",
                    f"stop_token_ids must be non-negative integers, got {token_id!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            bad("logprobs", f"logprobs must be a non-negative integer, got {self.logprobs!r}")
