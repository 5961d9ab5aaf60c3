"""``mtpserve stress``: the load generator (bench/loadgen.py) against this server on loopback, then
the leak checks: no running or waiting request, every KV block free, nothing left in the engine's
tables, and memory (RSS) before and after. A short warm-up round runs first, so the memory baseline
is taken once allocations have settled."""

from __future__ import annotations

import asyncio
import gc
import json
import time

from mtpserve.bench import loadgen
from mtpserve.cli.engine_args import engine_from_args
from mtpserve.engine.async_engine import EngineClient
from mtpserve.engine.errors import MtpserveError
from mtpserve.server.app import build_app
from mtpserve.server.background import serve_in_background

CHAT_OVERHEAD = 32  # tokens a chat template may add around a prompt


def add_args(p) -> None:
    g = p.add_argument_group("stress")
    g.add_argument("--requests", type=int, default=1000,
                   help="requests to send (with --duration: per round)")
    g.add_argument("--duration", type=float, default=None,
                   help="seconds to keep going, round after round of --requests")
    g.add_argument("--concurrency", type=int, default=32, help="clients in flight at once")
    g.add_argument("--abort-fraction", type=float, default=0.2,
                   help="share of clients that disconnect at a random point")
    g.add_argument("--max-tokens", type=int, default=64,
                   help="largest max_tokens of a request (each draws 1..this)")
    g.add_argument("--num-prompts", type=int, default=32, help="distinct prompts (1 to 120 words)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print the report as one JSON object")


def check_args(args) -> None:
    for name in ("requests", "concurrency", "max_tokens", "num_prompts"):
        if getattr(args, name) < 1:
            raise MtpserveError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.abort_fraction <= 1:
        raise MtpserveError("--abort-fraction must be in [0, 1]")
    if args.duration is not None and args.duration <= 0:
        raise MtpserveError("--duration must be positive")


def mib(value: int | None) -> float | None:
    if value is None:
        return None
    return round(value / 2**20, 1)


def run(args) -> int:
    check_args(args)
    client = EngineClient(build=lambda: engine_from_args(args), log_interval=0)
    engine = client.engine
    # so that every request fits the context
    room = engine.max_model_len - args.max_tokens - CHAT_OVERHEAD
    if room < 8:
        raise MtpserveError(f"--max-tokens {args.max_tokens} leaves no room for prompts in the "
                            f"model's context ({engine.max_model_len} tokens)")
    pool = loadgen.prompt_pool(args.num_prompts, args.seed)
    prompts = [loadgen.fit_prompt(p, engine.tokenizer, room) for p in pool]
    checker = loadgen.Checker(loadgen.LoadReport(), engine.max_model_len)

    def jobs(count: int, seed: int, start: int = 0) -> list:
        return loadgen.make_jobs(prompts, count, seed, args.abort_fraction, args.max_tokens, start)

    try:
        with serve_in_background(build_app(client, "stress")) as url:
            def load(batch, check, deadline=None):
                load_run = loadgen.run_load(url, batch, args.concurrency, check, deadline=deadline)
                asyncio.run(load_run)

            warmup_checker = loadgen.Checker(loadgen.LoadReport(), engine.max_model_len)
            load(jobs(2 * args.concurrency, args.seed - 1), warmup_checker)
            loadgen.wait_idle(client)
            gc.collect()
            rss_before = loadgen.rss_bytes()
            deadline = None
            if args.duration is not None:
                deadline = time.perf_counter() + args.duration
            rounds = 0
            while rounds == 0 or (deadline is not None and time.perf_counter() < deadline):
                batch = jobs(args.requests, args.seed + rounds, rounds * args.requests)
                load(batch, checker, deadline)
                rounds += 1
            state = loadgen.wait_idle(client)
            gc.collect()
            rss_after = loadgen.rss_bytes()
    finally:
        client.shutdown()
    report = {
        **checker.report.as_dict(),
        "leaked_blocks": state["used_blocks"],
        "engine_state": state,
        "preemptions": engine.scheduler.num_preemptions,
        "rss_mib_before": mib(rss_before),
        "rss_mib_after": mib(rss_after),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0 if not checker.report.errors and not any(state.values()) else 1
