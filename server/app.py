"""The FastAPI app: OpenAI routes, the error handlers and /metrics (bodies: responses.py; auth and limits: pure ASGI
middlewares of their own)."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from mtpserve import __version__
from mtpserve.engine.async_engine import StreamError
from mtpserve.engine.errors import RequestError
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.server.auth import APIKeyAuth
from mtpserve.server.client_limit import ClientLimit
from mtpserve.server.metrics import ServerMetrics
from mtpserve.server.openapi import ERRORS, STREAMS, drop_validation_schema
from mtpserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    message_dicts,
    unsupported_field,
)
from mtpserve.server.responses import APIError, error_response, respond
from mtpserve.server.size_limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADER_BYTES, SizeLimits
from starlette.exceptions import HTTPException

prompt_log = logging.getLogger("mtpserve.server.prompts")  # request content: only with --log-prompts


def validation_message(exc: RequestValidationError, content_type: str) -> tuple[str, str | None]:
    err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return f"unsupported field {param!r}", param
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc and "json" not in content_type:
        return f"the request body must be JSON sent as Content-Type: application/json, got {content_type!r}", None
    return f"{param or 'body'}: {err.get('msg')}", param


def disconnect_waiter(request: Request):
    """A coroutine factory that returns once the client has disconnected (the body is already read)."""
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return wait


def sampling_params(body, defaults, max_tokens: int, seed_offset: int) -> SamplingParams:
    """The engine's parameters for one choice; unset fields from the model's generation config."""
    def pick(name, fallback):
        value = getattr(body, name, None)
        if value is None:
            value = getattr(defaults, name, None)
        return fallback if value is None else value

    seed = None if body.seed is None else body.seed + seed_offset
    return SamplingParams(
        max_tokens=max_tokens, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
        top_k=pick("top_k", 0), min_p=pick("min_p", 0.0), seed=seed,
        repetition_penalty=pick("repetition_penalty", 1.0), presence_penalty=pick("presence_penalty", 0.0),
        frequency_penalty=pick("frequency_penalty", 0.0), ignore_eos=body.ignore_eos, stop=body.stop_list(),
        logprobs=body.num_logprobs())


def build_app(engine_client, served_model_name: str, api_key: str | None = None,
              max_queue: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, metrics_public: bool = False,
              max_concurrent_per_client: int | None = None, log_prompts: bool = False) -> FastAPI:
    app = FastAPI(title="mtpserve", version=__version__, responses=ERRORS)
    drop_validation_schema(app)
    # added innermost first: size limits, then the API key, then the per-client limit, then the routes
    if max_concurrent_per_client is not None:
        app.add_middleware(ClientLimit, limit=max_concurrent_per_client)
    if api_key:
        app.add_middleware(APIKeyAuth, api_key=api_key, public_paths=("/health", "/metrics") if metrics_public
                           else ("/health",))
    app.add_middleware(SizeLimits, max_body_bytes=max_body_bytes, max_header_bytes=max_header_bytes)
    metrics = ServerMetrics(served_model_name)
    app.state.metrics, app.state.client = metrics, engine_client
    engine = engine_client.engine
    tok = engine_client.tokenizer

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc, request.headers.get("content-type", ""))
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message, code="request_too_large" if exc.status_code == 413 else None,
                              headers=exc.headers)  # e.g. Allow on a 405

    @app.exception_handler(Exception)
    async def crashed(_, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}")

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                           "model", "model_not_found")

    def check_body(body) -> None:
        check_model(body.model)
        field = unsupported_field(body)
        if field:
            raise APIError(400, f"{field!r} is not supported by this server", field, "unsupported_field")
        if getattr(body, "top_logprobs", None) is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")

    async def start_all(body, prompts: list[list[int]], max_tokens, prefix: str) -> list:
        if max_queue is not None and engine_client.num_waiting() >= max_queue:
            raise APIError(429, f"the server queue is full ({max_queue} waiting requests); retry later",
                           code="queue_full")
        spec_n_max = body.speculative.spec_n_max() if body.speculative else None
        if spec_n_max is not None:  # never beyond the engine's own limit (its lookahead is sized for that)
            spec_n_max = min(spec_n_max, engine.config.spec_draft_n_max)
        streams = []
        try:
            for p, ids in enumerate(prompts):
                limit = max_tokens if max_tokens else max(engine.max_model_len - len(ids), 1)
                for j in range(body.n):
                    sp = sampling_params(body, engine.checkpoint.generation, limit, j)
                    streams.append(await engine_client.start(f"{prefix}-{p * body.n + j}", ids, sp, spec_n_max,
                                                             metrics))
                    metrics.on_prompt(len(ids))
        except (RequestError, StreamError) as e:
            for s in streams:
                s.close()
            if isinstance(e, StreamError):
                raise APIError(e.status, str(e), code=e.code) from None
            param = "prompt" if e.param == "messages" and prefix.startswith("cmpl") else e.param
            raise APIError(400, str(e), param, e.code) from None
        return streams

    def render_chat(messages) -> str:
        try:
            return tok.apply_chat_template(message_dicts(messages))
        except (ValueError, RequestError) as e:  # the template's own raise_exception included
            raise APIError(400, str(e), "messages") from None

    def log_prompt(rid: str, prompt) -> None:
        if log_prompts:
            prompt_log.info("%s prompt: %r", rid, prompt)

    @app.post("/v1/chat/completions", responses=STREAMS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_body(body)
        text = render_chat(body.messages)
        ids = tok.encode(text, add_special_tokens=False)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        log_prompt(rid, text)
        streams = await start_all(body, [ids], body.max_completion_tokens or body.max_tokens, rid)
        return await respond(body, streams, rid, True, served_model_name, tok, disconnect_waiter(request))

    @app.post("/v1/completions", responses=STREAMS)
    async def completions(body: CompletionRequest, request: Request):
        check_body(body)
        prompts = [tok.encode(p, add_special_tokens=True) if isinstance(p, str) else p for p in body.prompts()]
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        log_prompt(rid, body.prompt)
        streams = await start_all(body, prompts, body.max_tokens or 16, rid)
        return await respond(body, streams, rid, False, served_model_name, tok, disconnect_waiter(request))

    @app.get("/v1/models")
    async def models():
        card = {"id": served_model_name, "object": "model", "created": 0, "owned_by": "mtpserve",
                "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if engine_client.healthy:
            return {"status": "ok"}
        return error_response(503, "the engine is not running", code="engine_dead")

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", "prompt")
        if body.messages is not None:
            ids = tok.encode(render_chat(body.messages), add_special_tokens=False)
        else:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        vocab = engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(engine_client), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
