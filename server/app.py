"""The FastAPI app: OpenAI routes, SSE streaming, auth, the error envelope and /metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from mtpserve import __version__
from mtpserve.engine.errors import RequestError
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.server.async_engine import EngineDeadError, merged_deltas
from mtpserve.server.metrics import ServerMetrics
from mtpserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    message_dicts,
    unsupported_field,
)
from starlette.exceptions import HTTPException

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return f"unsupported field {param!r}", param
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    return f"{param or 'body'}: {err.get('msg')}", param


def sampling_params(body, defaults, max_tokens: int, seed_offset: int) -> SamplingParams:
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
        frequency_penalty=pick("frequency_penalty", 0.0), ignore_eos=body.ignore_eos, stop=body.stop_list())


def request_metrics(stream) -> dict:
    return {"speculative": stream.request.spec_stats.to_dict(), "timings": stream.request.timings()}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(engine_client, served_model_name: str, api_key: str | None = None,
              max_queue: int | None = None) -> FastAPI:
    app = FastAPI(title="mtpserve", version=__version__)
    metrics = ServerMetrics(served_model_name)
    app.state.metrics, app.state.client = metrics, engine_client
    engine = engine_client.engine
    tok = engine_client.tokenizer

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def crashed(_, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "missing or invalid API key", code="invalid_api_key")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                           "model", "model_not_found")

    def check_body(body) -> None:
        check_model(body.model)
        field = unsupported_field(body)
        if field:
            raise APIError(400, f"{field!r} is not supported by this server", field, "unsupported_field")

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
        except (RequestError, EngineDeadError) as e:
            for s in streams:
                s.close()
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e), code="engine_dead") from None
            param = "prompt" if e.param == "messages" and prefix.startswith("cmpl") else e.param
            raise APIError(400, str(e), param, e.code) from None
        return streams

    def usage(streams, n: int) -> dict:
        prompt = sum(s.request.num_prompt_tokens for s in streams) // n
        completion = sum(s.num_tokens for s in streams)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def respond(body, streams, rid: str, chat: bool):
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": served_model_name}
        if not body.stream:
            try:
                texts = await asyncio.gather(*(s.collect() for s in streams))
            except EngineDeadError as e:
                raise APIError(503, str(e), code="engine_dead") from None
            choices = []
            for i, (s, text) in enumerate(zip(streams, texts)):
                choice = {"index": i, "logprobs": None, "finish_reason": s.finish_reason}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                if len(streams) > 1:
                    choice["metrics"] = request_metrics(s)
                choices.append(choice)
            out = {**head, "choices": choices, "usage": usage(streams, body.n)}
            if len(streams) == 1:
                out["metrics"] = request_metrics(streams[0])
            return JSONResponse(out)

        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(i, text, finish=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice]}

        async def events():
            if chat:
                for i in range(len(streams)):
                    yield sse(chunk(i, "", first=True))
            async for i, text, end in merged_deltas(streams):
                if isinstance(end, EngineDeadError):
                    yield sse({"error": {"message": str(end), "type": "service_unavailable", "param": None,
                                         "code": "engine_dead"}})
                    return
                if end is None:
                    if text:
                        yield sse(chunk(i, text))
                    continue
                final = chunk(i, "", end)
                final["metrics"] = request_metrics(streams[i])
                yield sse(final)
            if include_usage:
                last = {**head, "choices": [], "usage": usage(streams, body.n)}
                if len(streams) == 1:
                    last["metrics"] = request_metrics(streams[0])
                yield sse(last)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_body(body)
        try:
            text = tok.apply_chat_template(message_dicts(body.messages))
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        ids = tok.encode(text, add_special_tokens=False)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await start_all(body, [ids], body.max_completion_tokens or body.max_tokens, rid)
        return await respond(body, streams, rid, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_body(body)
        prompts = [tok.encode(p, add_special_tokens=True) if isinstance(p, str) else p for p in body.prompts()]
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await start_all(body, prompts, body.max_tokens or 16, rid)
        return await respond(body, streams, rid, chat=False)

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
            try:
                ids = tok.encode(tok.apply_chat_template(message_dicts(body.messages)), add_special_tokens=False)
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
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

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(engine_client), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
