"""``mtpserve bench-serve``: streaming load on any OpenAI-compatible server (/v1/chat/completions or
/v1/completions) at one or more concurrency levels: TTFT, TPOT, ITL and end-to-end latency, output tok/s, request
throughput and errors; with our server, the speculative counters of /metrics before and after each level."""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import itertools
import json
import os
import sys
import time

from mtpserve.engine.errors import MtpserveError


def add_args(p) -> None:
    from mtpserve.bench.engine_bench import name_list, number_list

    p.add_argument("--base-url", required=True, help="server address, e.g. http://127.0.0.1:8000 (a trailing /v1 "
                                                     "is accepted)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    p.add_argument("--endpoint", default="chat", choices=["chat", "completions"],
                   help="chat: /v1/chat/completions with messages; completions: /v1/completions with the prompt "
                        "text (a conversation sends its last message)")
    p.add_argument("--concurrency", type=number_list(int), default=[1], help="requests in flight, e.g. 1,4,16")
    p.add_argument("--num-requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--prompts", default=None, help="JSONL prompts as for mtpserve bench (default: built-in set)")
    p.add_argument("--kinds", type=name_list, default=None, help="prompt kinds to use (default: all)")
    p.add_argument("--per-kind", type=int, default=8, help="prompts of each kind, reused round-robin")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on every prompt's max_tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos (an extension of mtpserve, vLLM and llama.cpp) for fixed-length outputs")
    p.add_argument("--metrics-url", default=None, help="Prometheus endpoint (default: BASE/metrics)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default="bench-serve-results", help="directory for results.json and summary.md")


def request_body(args, prompt) -> dict:
    body = {"model": args.model, "max_tokens": prompt.max_tokens, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        return {**body, "messages": prompt.chat_messages()}
    return {**body, "prompt": prompt.text}


async def one_request(client, path: str, body: dict, chat: bool) -> dict:
    """Stream one completion; times of each chunk that carried text, the completion tokens from the final usage
    chunk (else the count of text chunks), or an error message."""
    import httpx

    start = time.perf_counter()
    arrivals, usage_tokens = [], None
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
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        arrivals.append(time.perf_counter())
    except (httpx.HTTPError, ValueError, AttributeError) as e:  # transport, timeouts, bad JSON: counted
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    end = time.perf_counter()
    if not arrivals:
        return {"error": "no text in the response"}
    tokens = usage_tokens if usage_tokens is not None else len(arrivals)
    ttft, e2e = arrivals[0] - start, end - start
    return {"ttft": ttft, "e2e": e2e, "tokens": tokens, "itl": [b - a for a, b in itertools.pairwise(arrivals)],
            "tpot": (e2e - ttft) / (tokens - 1) if tokens > 1 else None}


async def scrape(client, url: str) -> dict | None:
    import httpx
    from mtpserve.bench.stats import spec_counters

    try:
        r = await client.get(url)
        return spec_counters(r.text) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):  # unreachable, or not a Prometheus exposition
        return None


async def run_level(client, args, prompts, concurrency: int) -> dict:
    from mtpserve.bench.stats import spec_delta, summarize

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
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    ms = 1000.0
    return {
        "concurrency": concurrency, "num_requests": len(bodies), "completed": len(ok), "errors": len(errors),
        "error_samples": sorted(set(errors))[:5], "duration_s": duration, "total_output_tokens": tokens,
        "output_tok_s": tokens / duration, "request_throughput": len(ok) / duration,
        "ttft_ms": summarize(r["ttft"] * ms for r in ok),
        "tpot_ms": summarize(r["tpot"] * ms for r in ok if r["tpot"] is not None),
        "itl_ms": summarize(x * ms for r in ok for x in r["itl"]),
        "e2e_ms": summarize(r["e2e"] * ms for r in ok),
        "speculative": spec_delta(before, after) if before is not None and after is not None else None,
    }


async def default_model(client) -> str:
    import httpx

    try:
        r = await client.get("/v1/models")
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, LookupError, TypeError) as e:
        raise MtpserveError(f"cannot list the server's models ({type(e).__name__}: {e}); pass --model") from None


async def bench(args, prompts) -> list[dict]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 2)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout, limits=limits) as c:
        if args.model is None:
            args.model = await default_model(c)
        levels = []
        for concurrency in args.concurrency:
            levels.append(await run_level(c, args, prompts, concurrency))
            print(f"concurrency {concurrency}: {levels[-1]['completed']} ok, {levels[-1]['errors']} errors, "
                  f"{levels[-1]['output_tok_s']:.1f} output tok/s", file=sys.stderr)
        return levels


def run(args) -> int:
    from mtpserve.bench.summary import serve_summary, write_report
    from mtpserve.bench.workload import load_prompts

    if importlib.util.find_spec("httpx") is None:
        raise MtpserveError("bench-serve needs httpx: pip install 'mtpserve[bench]'")
    if args.num_requests < 1 or args.per_kind < 1 or not args.concurrency or min(args.concurrency) < 1:
        raise MtpserveError("--num-requests, --per-kind and --concurrency must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise MtpserveError("--max-tokens must be at least 1")
    if args.timeout <= 0 or args.temperature < 0:
        raise MtpserveError("--timeout must be positive and --temperature >= 0")
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    args.metrics_url = args.metrics_url or args.base_url + "/metrics"
    args.api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or None
    prompts = load_prompts(args.prompts, args.kinds, args.per_kind, args.max_tokens)
    levels = asyncio.run(bench(args, prompts))
    results = {"meta": {"base_url": args.base_url, "endpoint": args.endpoint, "model": args.model,
                        "num_requests": args.num_requests, "prompts": args.prompts or "built-in eval set",
                        "num_prompts": len(prompts), "temperature": args.temperature, "ignore_eos": args.ignore_eos,
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
               "levels": levels}
    write_report(args.out, results, serve_summary(results))
    return 0
