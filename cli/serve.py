"""``mtpserve serve``: the OpenAI-compatible HTTP server (uvicorn)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal

import uvicorn

from mtpserve.cli.engine_args import engine_from_args
from mtpserve.engine.async_engine import EngineClient
from mtpserve.engine.errors import MtpserveError
from mtpserve.server.app import build_app
from mtpserve.server.chat_prompt import ServerChatSettings
from mtpserve.server.tool_parsers import PARSER_CHOICES

logger = logging.getLogger(__name__)


def add_args(p) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    g.add_argument("--served-model-name", default=None,
                   help="model id clients use (default: from --model)")
    g.add_argument("--max-queue", type=int, default=None,
                   help="answer 429 when this many requests are waiting")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="answer 413 for larger request bodies")
    g.add_argument("--max-header-bytes", type=int, default=16 << 10,
                   help="answer 431 for larger request headers")
    g.add_argument("--max-concurrent-per-client", type=int, default=None,
                   help="answer 429 to a client address with "
                        "this many completions already in flight")
    g.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without the API key")
    g.add_argument("--log-prompts", action="store_true",
                   help="log each request's prompt text (INFO); "
                        "without it no request content is logged")
    g.add_argument("--log-interval", type=float, default=5.0,
                   help="seconds between INFO progress lines while busy (0 disables)")
    g.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds in-flight requests may run on after SIGTERM")
    g.add_argument("--allowed-origins", type=origin_list, default=None,
                   help="comma-separated origins browsers may call from (CORS; '*' for any); "
                        "default: none")
    g.add_argument("--sse-keepalive", type=float, default=15.0,
                   help="seconds of silence in a stream (a long prefill) before a keep-alive "
                        "comment (0 disables)")
    c = p.add_argument_group("chat")
    c.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file used instead of the model's")
    c.add_argument("--reasoning-parser", default="auto", choices=["auto", "think", "none"],
                   help="split <think>...</think> into reasoning_content: auto (when the "
                        "template uses <think>), think (always) or none")
    c.add_argument("--tool-call-parser", default="auto", choices=PARSER_CHOICES,
                   help="the format tool calls are read in (auto: from the chat template)")
    c.add_argument("--default-chat-template-kwargs", type=json_object, default=None,
                   metavar="JSON", help='template variables for every request, e.g. '
                                        '\'{"enable_thinking": false}\' (a request\'s '
                                        'chat_template_kwargs win)')


def origin_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def json_object(text: str) -> dict:
    """An argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def chat_settings(args) -> ServerChatSettings:
    template = None
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                template = f.read()
        except OSError as e:
            raise MtpserveError(f"--chat-template: cannot read {args.chat_template} "
                                f"({e.strerror})") from None
    return ServerChatSettings(template, args.reasoning_parser, args.tool_call_parser,
                              args.default_chat_template_kwargs)


def served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model == "default":
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(args.model))


class GracefulServer(uvicorn.Server):
    """A uvicorn Server that, after a SIGTERM-initiated graceful shutdown, returns (exit 0) instead
    of re-raising the signal as uvicorn does (which would end the process with -SIGTERM)."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()


def check_args(args) -> None:
    if not 0 <= args.port < 65536:
        raise MtpserveError("--port must be in [0, 65535]")
    if args.max_queue is not None and args.max_queue < 0:
        raise MtpserveError("--max-queue must be >= 0")
    for name in ("max_body_bytes", "max_header_bytes"):
        if getattr(args, name) < 1:
            raise MtpserveError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_concurrent_per_client is not None and args.max_concurrent_per_client < 1:
        raise MtpserveError("--max-concurrent-per-client must be at least 1")
    if args.log_interval < 0 or args.shutdown_grace < 0:
        raise MtpserveError("--log-interval and --shutdown-grace must be >= 0")
    if args.sse_keepalive < 0:
        raise MtpserveError("--sse-keepalive must be >= 0")


def warn_if_exposed(host: str, api_key: str | None) -> bool:
    """Warn (and return True) when listening on every interface without an API key."""
    if host in ("0.0.0.0", "::", "") and not api_key:
        logger.warning("listening on all interfaces (%s) without --api-key: "
                       "anyone who can reach this port can use the model", host or "*")
        return True
    return False


def run(args) -> int:
    check_args(args)
    api_key = args.api_key or None
    warn_if_exposed(args.host, api_key)
    settings = chat_settings(args)
    if args.log_prompts:  # its own level, so the flag alone is enough at the default --log-level
        logging.getLogger("mtpserve.server.prompts").setLevel(logging.INFO)
    client = EngineClient(build=lambda: engine_from_args(args), log_interval=args.log_interval)
    engine = client.engine
    name = served_name(args)
    app = build_app(client, name, api_key=api_key, max_queue=args.max_queue,
                    max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes,
                    metrics_public=args.metrics_public,
                    max_concurrent_per_client=args.max_concurrent_per_client,
                    log_prompts=args.log_prompts, chat_settings=settings,
                    sse_keepalive=args.sse_keepalive, allowed_origins=args.allowed_origins)
    print(f"mtpserve: serving {name!r} ({args.model}) on "
          f"http://{args.host}:{args.port}/v1 ; {engine.summary()}", flush=True)
    try:
        # h11, whose cap on the request head uvicorn lets us set: a head over it is refused by the
        # parser; heads over --max-header-bytes but under the cap get the app's 431 in the error
        # envelope
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=args.shutdown_grace, http="h11",
                                h11_max_incomplete_event_size=args.max_header_bytes + (8 << 10))
        GracefulServer(config).run()
    finally:
        client.shutdown()
    return 0
