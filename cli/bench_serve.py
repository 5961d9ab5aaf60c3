"""``mtpserve bench-serve``: the options of the HTTP load test (bench/serve_bench.py), their checks,
and the run: measure, then write results.json and summary.md."""

from __future__ import annotations

import os

from mtpserve.bench import multi_turn, serve_bench
from mtpserve.bench.summary import serve_summary, write_report
from mtpserve.bench.workload import load_prompts
from mtpserve.cli.bench import name_list, number_list
from mtpserve.engine.errors import MtpserveError


def add_args(p) -> None:
    p.add_argument("--base-url", required=True,
                   help="server address, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--model", default=None,
                   help="model name to request (default: the first of /v1/models)")
    p.add_argument("--endpoint", default="chat", choices=["chat", "completions"],
                   help="chat: /v1/chat/completions with messages; completions: /v1/completions "
                        "with the prompt text (a conversation sends its last message)")
    p.add_argument("--concurrency", type=number_list(int), default=[1],
                   help="requests in flight, e.g. 1,4,16")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per concurrency level (default 32; single workload)")
    p.add_argument("--workload", default="single", choices=["single", "multi-turn"],
                   help="single: independent requests; multi-turn: conversations that grow turn "
                        "by turn (chat endpoint), TTFT per turn")
    p.add_argument("--conversations", type=int, default=None,
                   help="multi-turn: conversations per concurrency level (default 8)")
    p.add_argument("--turns", type=int, default=None,
                   help="multi-turn: questions per conversation (default 4)")
    p.add_argument("--system-tokens", type=int, default=None,
                   help="multi-turn: about this many tokens of system prompt opening each "
                        "conversation, its own (default 2000)")
    p.add_argument("--prompts", default=None,
                   help="JSONL prompts as for mtpserve bench, sent without a response_format "
                        '(a line\'s "schema" is not sent) (default: built-in set)')
    p.add_argument("--kinds", type=name_list, default=None,
                   help="prompt kinds to use (default: all)")
    p.add_argument("--per-kind", type=int, default=8,
                   help="prompts of each kind, reused round-robin")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on every prompt's max_tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos (an extension of mtpserve, "
                        "vLLM and llama.cpp) for fixed-length outputs")
    p.add_argument("--metrics-url", default=None,
                   help="Prometheus endpoint (default: BASE/metrics)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default="bench-serve-results",
                   help="directory for results.json and summary.md")


MULTI_TURN_DEFAULTS = {"conversations": 8, "turns": 4, "system_tokens": 2000}


def resolve_workload(args) -> None:
    """Fill in the defaults of the chosen workload; an option of the other one is an error."""
    multi = args.workload == "multi-turn"
    if multi and args.num_requests is not None:
        raise MtpserveError("--num-requests is for the single workload; multi-turn sends "
                            "--conversations x --turns requests")
    if multi and args.endpoint != "chat":
        raise MtpserveError("--workload multi-turn sends conversations: use --endpoint chat")
    for name, default in MULTI_TURN_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if not multi and getattr(args, name) is not None:
            raise MtpserveError(f"{flag} is for --workload multi-turn")
        if multi and getattr(args, name) is None:
            setattr(args, name, default)
        if multi and getattr(args, name) < 1:
            raise MtpserveError(f"{flag} must be at least 1")
    if not multi and args.num_requests is None:
        args.num_requests = 32
    if multi:
        args.num_requests = args.conversations * args.turns


def check_args(args) -> None:
    resolve_workload(args)
    counts_ok = args.num_requests >= 1 and args.per_kind >= 1
    if not counts_ok or not args.concurrency or min(args.concurrency) < 1:
        raise MtpserveError("--num-requests, --per-kind and --concurrency must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise MtpserveError("--max-tokens must be at least 1")
    if args.timeout <= 0 or args.temperature < 0:
        raise MtpserveError("--timeout must be positive and --temperature >= 0")


def run(args) -> int:
    check_args(args)
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    args.metrics_url = args.metrics_url or args.base_url + "/metrics"
    args.api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or None
    prompts = load_prompts(args.prompts, args.kinds, args.per_kind, args.max_tokens)
    level_runner = serve_bench.run_level
    if args.workload == "multi-turn":
        level_runner = multi_turn.run_level
    results = serve_bench.measure(args, prompts, level_runner)
    if args.workload == "multi-turn":
        results["meta"].update(conversations=args.conversations, turns=args.turns,
                               system_tokens=args.system_tokens)
    write_report(args.out, results, serve_summary(results))
    return 0
