"""The server's Prometheus metrics (request counts, token counts, latencies, draft acceptance), in
a registry owned by one app."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)
RATE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LENGTH_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
SPEED_BUCKETS = (1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 500, 1000, 2000)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        reg = self.registry
        label = ["model_name"]

        def gauge(name, doc):
            return Gauge(name, doc, label, registry=reg)

        def counter(name, doc, extra=()):
            return Counter(name, doc, label + list(extra), registry=reg)

        def histogram(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(name, doc, label, buckets=buckets, registry=reg)

        self.running = gauge("mtpserve_requests_running", "Requests being computed")
        self.waiting = gauge("mtpserve_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = gauge("mtpserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use")
        self.prompt_tokens = counter("mtpserve_prompt_tokens", "Prompt tokens of accepted requests")
        self.generation_tokens = counter("mtpserve_generation_tokens",
                                         "Generated tokens returned to clients")
        self.success = counter("mtpserve_request_success", "Finished requests", ["finished_reason"])
        self.preemptions = counter("mtpserve_preemptions", "Requests preempted (recomputed later)")
        self.prefix_queries = counter("mtpserve_prefix_cache_queries",
                                      "Tokens of admitted requests looked up in the prefix cache")
        self.prefix_hits = counter("mtpserve_prefix_cache_hits",
                                   "Tokens found in the prefix cache (not computed again)")
        self.http_requests = counter("mtpserve_http_requests", "HTTP requests answered",
                                     ["route", "status"])
        self.spec_drafts = counter("mtpserve_spec_drafts", "Verify steps that carried draft tokens")
        self.spec_draft_tokens = counter("mtpserve_spec_draft_tokens",
                                         "Draft tokens proposed by MTP")
        self.spec_accepted = counter("mtpserve_spec_accepted_tokens", "Draft tokens accepted")
        self.spec_per_position = counter("mtpserve_spec_accepted_tokens_per_position",
                                         "Draft tokens accepted at each draft position",
                                         ["position"])
        self.ttft = histogram("mtpserve_time_to_first_token_seconds", "Time to first token")
        self.itl = histogram("mtpserve_inter_token_latency_seconds",
                             "Time between token deliveries, per token")
        self.e2e = histogram("mtpserve_e2e_request_latency_seconds", "Arrival to finish")
        self.queue_time = histogram("mtpserve_request_queue_time_seconds",
                                    "Arrival to first scheduling")
        self.prefill_time = histogram("mtpserve_request_prefill_time_seconds",
                                      "First scheduling to first token")
        self.acceptance_rate = histogram("mtpserve_request_acceptance_rate",
                                         "Per-request draft acceptance rate", RATE_BUCKETS)
        self.acceptance_length = histogram("mtpserve_request_acceptance_length",
                                           "Per-request tokens per verify step", LENGTH_BUCKETS)
        self.decode_speed = histogram("mtpserve_request_decode_tokens_per_second",
                                      "Per-request decode speed", SPEED_BUCKETS)
        self._preemptions_seen = 0
        self._prefix_seen = (0, 0)  # (queries, hits) already counted

    def on_http(self, route: str, status: int) -> None:
        self.http_requests.labels(self.model_name, route, str(status)).inc()

    def on_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(num_tokens)

    def on_tokens(self, count: int, gap_seconds: float | None) -> None:
        """``count`` tokens reached a client, ``gap_seconds``
        after the previous ones (None for the first)."""
        self.generation_tokens.labels(self.model_name).inc(count)
        if gap_seconds is not None:
            for _ in range(count):
                self.itl.labels(self.model_name).observe(gap_seconds / count)

    def on_finish(self, stream, finish_reason: str) -> None:
        """A request ended; ``stream`` (a TextStream) holds
        its timings and statistics as of its last output."""
        m = self.model_name
        self.success.labels(m, finish_reason).inc()
        t = stream.timings
        if t.get("queue_ms"):
            self.queue_time.labels(m).observe(t["queue_ms"] / 1000)
        if t.get("ttft_ms"):
            self.prefill_time.labels(m).observe(t["prefill_ms"] / 1000)
            self.ttft.labels(m).observe(t["ttft_ms"] / 1000)
        self.e2e.labels(m).observe(time.perf_counter() - stream.arrival_time)
        if t.get("decode_tokens_per_second", 0) > 0:
            self.decode_speed.labels(m).observe(t["decode_tokens_per_second"])
        drafting = stream.spec_stats
        if drafting.num_draft_tokens:
            self.spec_drafts.labels(m).inc(drafting.num_drafts)
            self.spec_draft_tokens.labels(m).inc(drafting.num_draft_tokens)
            self.spec_accepted.labels(m).inc(drafting.num_accepted_tokens)
            for position, count in enumerate(drafting.accepted_per_position):
                self.spec_per_position.labels(m, str(position)).inc(count)
            self.acceptance_rate.labels(m).observe(drafting.acceptance_rate)
            self.acceptance_length.labels(m).observe(drafting.mean_acceptance_length)

    def _count_prefix_cache(self, kv) -> None:
        """Move the prefix-cache counters by what the engine looked up since the last scrape."""
        queries = kv.num_queried_tokens
        hits = kv.num_hit_tokens
        seen_queries, seen_hits = self._prefix_seen
        self.prefix_queries.labels(self.model_name).inc(max(queries - seen_queries, 0))
        self.prefix_hits.labels(self.model_name).inc(max(hits - seen_hits, 0))
        self._prefix_seen = (queries, hits)

    def render(self, client) -> bytes:
        """Refresh the gauges from the engine, then the text exposition format."""
        m = self.model_name
        engine = client.engine
        self.running.labels(m).set(client.num_running())
        self.waiting.labels(m).set(client.num_waiting())
        self.kv_usage.labels(m).set(engine.kv.usage())
        seen = engine.scheduler.num_preemptions
        self.preemptions.labels(m).inc(max(seen - self._preemptions_seen, 0))
        self._preemptions_seen = seen
        self._count_prefix_cache(engine.kv)
        # make the labelled series exist from the start, so every name is present before the
        # first request
        per_model = (
            self.prompt_tokens, self.generation_tokens, self.spec_drafts, self.spec_draft_tokens,
            self.spec_accepted, self.ttft, self.itl, self.e2e, self.queue_time, self.prefill_time,
            self.acceptance_rate, self.acceptance_length, self.decode_speed,
        )
        for metric in per_model:
            metric.labels(m)
        for reason in ("stop", "length", "abort", "error"):
            self.success.labels(m, reason)
        self.spec_per_position.labels(m, "0")
        return generate_latest(self.registry)
