"""Response bodies: the OpenAI error envelope, non-stream completions and the SSE stream of chunks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from fastapi.responses import JSONResponse, Response, StreamingResponse
from mtpserve.engine.async_engine import StreamError, merged_deltas
from mtpserve.server.logprobs import chat_logprobs, completion_logprobs

logger = logging.getLogger(__name__)

ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
               503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error envelope."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def request_metrics(stream) -> dict:
    return {"speculative": stream.request.spec_stats.to_dict(), "timings": stream.request.timings()}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(streams, n: int) -> dict:
    prompt = sum(s.request.num_prompt_tokens for s in streams) // n
    completion = sum(s.num_tokens for s in streams)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def collect_all(streams, disconnected=None) -> list[str] | None:
    """Every stream's full text; None when ``disconnected()`` (the client went away) returns first, and then
    the streams are aborted, freeing their KV blocks."""
    gathered = asyncio.ensure_future(asyncio.gather(*(s.collect() for s in streams)))
    watch = asyncio.ensure_future(disconnected()) if disconnected is not None else None

    def abandon() -> None:
        gathered.cancel()
        gathered.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: nothing to report
        for s in streams:
            s.close()

    try:
        await asyncio.wait([t for t in (gathered, watch) if t is not None], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        abandon()
        raise
    finally:
        if watch is not None:
            watch.cancel()
    if not gathered.done():
        abandon()
        return None
    return gathered.result()


async def respond(body, streams, rid: str, chat: bool, model_name: str, tok, disconnected=None):
    """The JSON response, or the SSE stream when ``body.stream``. ``disconnected``: an awaitable factory that
    returns when the client has gone (a non-stream request is then aborted; a stream notices by itself)."""
    created = int(time.time())
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name}
    want_logprobs = streams[0].request.sampling_params.logprobs is not None
    offsets = [0] * len(streams)

    def logprobs(i, entries):
        if not want_logprobs:
            return None
        if chat:
            return chat_logprobs(tok, entries)
        out, offsets[i] = completion_logprobs(tok, entries, offsets[i])
        return out

    if not body.stream:
        try:
            texts = await collect_all(streams, disconnected)
        except StreamError as e:
            raise APIError(e.status, str(e), code=e.code) from None
        if texts is None:
            return Response(status_code=499)  # nobody reads it: the client has gone
        choices = []
        for i, (s, text) in enumerate(zip(streams, texts)):
            choice = {"index": i, "logprobs": logprobs(i, s.take_logprobs()), "finish_reason": s.finish_reason}
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

    def chunk(i, text, finish=None, first=False, entries=()):
        lp = logprobs(i, entries) if entries else None
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
        return {**head, "choices": [choice]}

    async def events():
        """The chunks; a stream always ends with a finish reason or an error chunk, then [DONE]."""
        try:
            async with contextlib.aclosing(chunks()) as events_of_streams:
                async for event in events_of_streams:
                    yield event
        except Exception:
            logger.exception("stream %s failed", rid)
            yield sse(error_body(500, "internal error", code="internal_error"))
            yield "data: [DONE]\n\n"

    async def chunks():
        if chat:
            for i in range(len(streams)):
                yield sse(chunk(i, "", first=True))
        async for i, text, end, entries in merged_deltas(streams):
            if isinstance(end, StreamError):
                yield sse(error_body(end.status, str(end), code=end.code))
                yield "data: [DONE]\n\n"
                return
            if end is None:
                if text or entries:
                    yield sse(chunk(i, text, entries=entries))
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
