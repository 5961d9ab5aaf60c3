"""A generation request as the engine tracks it: tokens, progress, status and timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from mtpserve.engine.noise import RequestNoise
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.spec.stats import SpecStats


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    noise: RequestNoise = field(default_factory=lambda: RequestNoise.of(None))
    arrival_time: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    # per output token, when sampling_params.logprobs is set: (logprob, [(token_id, logprob)] top-n)
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    # speculation: drafts proposed for the next step, per-request limit and stats
    spec_token_ids: list[int] = field(default_factory=list)
    spec_n_max: int | None = None  # None: the engine's --spec-draft-n-max; 0: no speculation
    spec_stats: SpecStats = field(default_factory=SpecStats)
    # prefix caching: hashes of the hashable blocks of all_token_ids (kv_cache.py), and the prompt
    # tokens found in the cache when the request was first scheduled
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0

    def __post_init__(self):
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()

    def timings(self) -> dict:
        """The ``metrics.timings`` block of a response (milliseconds and tokens per second)."""
        def ms(a, b):
            return round((b - a) * 1000, 3) if a is not None and b is not None else 0.0

        prefill_ms = ms(self.first_scheduled_time, self.first_token_time)
        decode_ms = ms(self.first_token_time, self.finish_time)
        decoded = max(len(self.output_token_ids) - 1, 0)
        prompt_tps = round(self.num_prompt_tokens / (prefill_ms / 1000), 3) if prefill_ms else 0.0
        decode_tps = round(decoded / (decode_ms / 1000), 3) if decode_ms and decoded else 0.0
        return {
            "queue_ms": ms(self.arrival_time, self.first_scheduled_time),
            "prefill_ms": prefill_ms,
            "ttft_ms": ms(self.arrival_time, self.first_token_time),
            "decode_ms": decode_ms,
            "prompt_tokens_per_second": prompt_tps,
            "decode_tokens_per_second": decode_tps,
        }


def check_stop(request: Request, max_model_len: int) -> RequestStatus | None:
    """The status a request finishes with after its newest output token, or None to go on."""
    params = request.sampling_params
    token = request.output_token_ids[-1]
    if (token in request.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
        return RequestStatus.FINISHED_STOPPED
    if len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
