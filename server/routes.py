"""The OpenAI routes, /health, /version, /tokenize, /detokenize and /metrics. Each handler reaches
the engine client, the served model name, the limits and the metrics through ``request.app.state``
(set by ``build_app``)."""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from mtpserve import __version__
from mtpserve.engine.async_engine import StreamError
from mtpserve.engine.errors import RequestError
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.server.chat_output import OutputSpec
from mtpserve.server.chat_prompt import render
from mtpserve.server.errors import APIError, error_response, request_error, unsupported
from mtpserve.server.openapi import ERRORS, STREAMS
from mtpserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    unsupported_field,
)
from mtpserve.server.responses import json_response, sse_response
from mtpserve.server.structured import grammar_maker

# request content: only with --log-prompts
prompt_log = logging.getLogger("mtpserve.server.prompts")

router = APIRouter(responses=ERRORS)  # every route's default answer: an error in the envelope


def check_model(state, name: str | None) -> None:
    served = state.served_model_name
    if name is not None and name != served:
        message = f"the model {name!r} does not exist; this server serves {served!r}"
        raise APIError(404, message, "model", "model_not_found")


def check_body(state, body) -> None:
    """What the request models cannot say:
    the model, fields accepted but not supported, top_logprobs alone."""
    check_model(state, body.model)
    field = unsupported_field(body)
    if field:
        raise unsupported(field)
    if getattr(body, "top_logprobs", None) is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")


def check_queue(state) -> None:
    max_queue = state.max_queue
    if max_queue is not None and state.client.num_waiting() >= max_queue:
        raise APIError(429, f"the server queue is full ({max_queue} waiting requests); retry later",
                       code="queue_full")


def sampling_params(body, defaults, max_tokens: int, seed_offset: int) -> SamplingParams:
    """The engine's parameters for one choice; unset fields from the model's generation config."""
    def pick(name, fallback):
        value = getattr(body, name, None)
        if value is None:
            value = getattr(defaults, name, None)
        if value is None:
            return fallback
        return value

    seed = None
    if body.seed is not None:
        seed = body.seed + seed_offset
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=pick("top_k", 0),
        min_p=pick("min_p", 0.0),
        seed=seed,
        repetition_penalty=pick("repetition_penalty", 1.0),
        presence_penalty=pick("presence_penalty", 0.0),
        frequency_penalty=pick("frequency_penalty", 0.0),
        ignore_eos=body.ignore_eos,
        stop=body.stop_list(),
        logprobs=body.num_logprobs(),
        stop_token_ids=list(body.stop_token_ids or []),
        min_tokens=body.min_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
    )


def draft_limit(body, engine) -> int | None:
    """The request's most drafts per step (``speculative.n_max``), never beyond the engine's own
    (its lookahead is sized for that); None: the engine decides."""
    if not body.speculative:
        return None
    n_max = body.speculative.effective_n_max()
    if n_max is None:
        return None
    return min(n_max, engine.config.spec_draft_n_max)


def token_limit(engine, ids: list[int], max_tokens: int | None) -> int:
    """``max_tokens``, or when unset whatever the context leaves after the prompt."""
    if max_tokens:
        return max_tokens
    return max(engine.max_model_len - len(ids), 1)


async def start_all(state, body, prompts: list[list[int]], max_tokens: int | None, rid: str,
                    prompt_field: str, spec: OutputSpec | None = None) -> list:
    """Start ``body.n`` choices per prompt, named ``rid-0``, ``rid-1``, ...; when one cannot start,
    those started are closed. ``prompt_field``: the body's name for the prompt, for the error's
    ``param``; ``spec``: how a chat answer is read (a forced tool call has a grammar)."""
    check_queue(state)
    client = state.client
    engine = client.engine
    n_max = draft_limit(body, engine)
    streams = []
    try:
        make_grammar = grammar_maker(body, engine, spec)
        for p, ids in enumerate(prompts):
            limit = token_limit(engine, ids, max_tokens)
            for j in range(body.n):
                params = sampling_params(body, engine.checkpoint.generation, limit, j)
                if make_grammar is not None:
                    params.grammar = make_grammar()
                choice_id = f"{rid}-{p * body.n + j}"
                stream = await client.start(choice_id, ids, params, n_max, state.metrics)
                streams.append(stream)
                state.metrics.on_prompt(len(ids))
    except (RequestError, StreamError) as e:
        for s in streams:
            s.close()
        if isinstance(e, RequestError):
            raise request_error(e, prompt_field) from None
        raise  # answered with its own status (errors.stream_failed)
    return streams


def encode_prompts(tok, prompts: list) -> list[list[int]]:
    """Text prompts tokenized (with the special tokens), token-id prompts as they are."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            p = tok.encode(p, add_special_tokens=True)
        out.append(p)
    return out


def log_prompt(request: Request, rid: str, prompt) -> None:
    """The prompt, under the completion's id and the request's X-Request-Id."""
    if request.app.state.log_prompts:
        request_id = getattr(request.state, "request_id", None)
        prompt_log.info("%s (request %s) prompt: %r", rid, request_id, prompt)


def disconnect_waiter(request: Request):
    """A coroutine factory that returns once the client
    has disconnected (the body is already read)."""
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return wait


async def answer(request: Request, body, streams, rid: str, spec: OutputSpec | None):
    """The SSE stream when ``body.stream``, else the JSON body (a request whose client goes away
    is aborted). ``spec``: how a chat answer is read; None for a completion."""
    state = request.app.state
    tok = state.client.tokenizer
    if body.stream:
        return sse_response(body, streams, rid, spec, state.served_model_name, tok,
                            state.sse_keepalive)
    disconnected = disconnect_waiter(request)
    return await json_response(body, streams, rid, spec, state.served_model_name, tok,
                               disconnected)


@router.post("/v1/chat/completions", responses=STREAMS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state
    tok = state.client.tokenizer
    check_body(state, body)
    text, spec = render(tok, body, state.chat_settings)
    ids = tok.encode(text, add_special_tokens=False)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    log_prompt(request, rid, text)
    max_tokens = body.max_completion_tokens or body.max_tokens
    streams = await start_all(state, body, [ids], max_tokens, rid, "messages", spec)
    return await answer(request, body, streams, rid, spec)


@router.post("/v1/completions", responses=STREAMS)
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state
    check_body(state, body)
    prompts = encode_prompts(state.client.tokenizer, body.prompts())
    if not prompts:
        raise APIError(400, "prompt must not be empty", "prompt")
    rid = f"cmpl-{uuid.uuid4().hex}"
    log_prompt(request, rid, body.prompt)
    streams = await start_all(state, body, prompts, body.max_tokens or 16, rid, "prompt")
    return await answer(request, body, streams, rid, None)


@router.get("/v1/models")
async def models(request: Request):
    state = request.app.state
    card = {"id": state.served_model_name, "object": "model", "created": 0, "owned_by": "mtpserve",
            "max_model_len": state.client.engine.max_model_len}
    return {"object": "list", "data": [card]}


@router.get("/health")
async def health(request: Request):
    if request.app.state.client.healthy:
        return {"status": "ok"}
    return error_response(503, "the engine is not running", code="engine_dead")


@router.get("/version")
async def version():
    return {"version": __version__}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state = request.app.state
    tok = state.client.tokenizer
    check_model(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of 'prompt' or 'messages'", "prompt")
    if body.messages is not None:
        text, _ = render(tok, body, state.chat_settings)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.client.engine.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state = request.app.state
    check_model(state, body.model)
    vocab = state.client.engine.model_config.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
    return {"prompt": state.client.tokenizer.decode(body.tokens)}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request):
    state = request.app.state
    text = state.metrics.render(state.client)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")
