"""The load behind ``mtpserve bench-serve`` (options in cli/bench_serve.py): streaming requests to
any OpenAI-compatible server (/v1/chat/completions or /v1/completions) at one or more concurrency
levels: TTFT, TPOT, ITL and end-to-end latency, output tok/s, request throughput and errors; with
our server, the speculative counters of /metrics before and after each level."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import sys
import time

import httpx

from mtpserve.bench.stats import spec_counters, spec_delta, summarize
from mtpserve.engine.errors import MtpserveError


def stream_body(args, max_tokens: int) -> dict:
    """The settings every streamed request of the bench sends, its prompt aside."""
    body = {"model": args.model, "max_tokens": max_tokens, "temperature": args.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


def request_body(args, prompt) -> dict:
    body = stream_body(args, prompt.max_tokens)
    if args.endpoint == "chat":
        return {**body, "messages": prompt.chat_messages()}
    return {**body, "prompt": prompt.text}


async def one_request(client, path: str, body: dict, chat: bool) -> dict:
    """Stream one completion; times of each chunk that carried text, the text, the completion tokens
    from the final usage chunk (else the count of text chunks) and its prompt and cached tokens, or
    an error message."""
    start = time.perf_counter()
    arrivals = []
    texts = []
    usage = {}
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return {"error": f"HTTP {r.status_code}: {text[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    return {"error": f"stream error: {json.dumps(event['error'])[:200]}"}
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    if chat:
                        text = (choice.get("delta") or {}).get("content")
                    else:
                        text = choice.get("text")
                    if text:
                        arrivals.append(time.perf_counter())
                        texts.append(text)
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        # transport, timeouts, bad JSON: counted
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    end = time.perf_counter()
    if not arrivals:
        return {"error": "no text in the response"}
    tokens = usage.get("completion_tokens") or len(arrivals)
    ttft = arrivals[0] - start
    e2e = end - start
    itl = [b - a for a, b in itertools.pairwise(arrivals)]
    tpot = (e2e - ttft) / (tokens - 1) if tokens > 1 else None
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft": ttft, "e2e": e2e, "tokens": tokens, "itl": itl, "tpot": tpot,
            "text": "".join(texts), "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens")}


async def scrape(client, url: str) -> dict | None:
    try:
        r = await client.get(url)
        return spec_counters(r.text) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):  # unreachable, or not a Prometheus exposition
        return None


async def run_level(client, args, prompts, concurrency: int) -> dict:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    bodies = [request_body(args, prompts[i % len(prompts)]) for i in range(args.num_requests)]
    gate = asyncio.Semaphore(concurrency)

    async def gated(body):
        async with gate:
            return await one_request(client, path, body, args.endpoint == "chat")

    before = await scrape(client, args.metrics_url)
    start = time.perf_counter()
    results = await asyncio.gather(*(gated(b) for b in bodies))
    duration = time.perf_counter() - start
    after = await scrape(client, args.metrics_url)
    return level_stats(concurrency, results, duration, before, after)


def level_stats(concurrency: int, results: list[dict], duration: float, before, after) -> dict:
    """One level's figures from its requests' ``one_request`` results and the server's counters
    scraped before and after it (None: not our server)."""
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    ms = 1000.0
    itl = []
    for r in ok:
        itl += [x * ms for x in r["itl"]]
    speculative = None
    if before is not None and after is not None:
        speculative = spec_delta(before, after)
    return {
        "concurrency": concurrency,
        "num_requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "duration_s": duration,
        "total_output_tokens": tokens,
        "output_tok_s": tokens / duration,
        "request_throughput": len(ok) / duration,
        "ttft_ms": summarize(r["ttft"] * ms for r in ok),
        "tpot_ms": summarize(r["tpot"] * ms for r in ok if r["tpot"] is not None),
        "itl_ms": summarize(itl),
        "e2e_ms": summarize(r["e2e"] * ms for r in ok),
        "speculative": speculative,
    }


async def default_model(client) -> str:
    try:
        r = await client.get("/v1/models")
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, LookupError, TypeError) as e:
        raise MtpserveError("cannot list the server's models "
                            f"({type(e).__name__}: {e}); pass --model") from None


async def bench(args, prompts, level_runner) -> list[dict]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 2)
    client = httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout,
                               limits=limits)
    async with client:
        if args.model is None:
            args.model = await default_model(client)
        levels = []
        for concurrency in args.concurrency:
            level = await level_runner(client, args, prompts, concurrency)
            levels.append(level)
            print(f"concurrency {concurrency}: {level['completed']} ok, {level['errors']} errors, "
                  f"{level['output_tok_s']:.1f} output tok/s", file=sys.stderr)
        return levels


def measure(args, prompts, level_runner=run_level) -> dict:
    """Every concurrency level of ``args`` (options as checked by cli/bench_serve.py): the results.
    ``level_runner``: the workload of one level (``run_level``: independent requests; the
    multi-turn one is ``multi_turn.run_level``)."""
    levels = asyncio.run(bench(args, prompts, level_runner))
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": args.model,
        "workload": args.workload,
        "num_requests": args.num_requests,
        "prompts": args.prompts or "built-in eval set",
        "num_prompts": len(prompts),
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "date": now.isoformat(timespec="seconds"),
    }
    return {"meta": meta, "levels": levels}
