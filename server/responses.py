"""Response bodies: the OpenAI error envelope, non-stream completions and the SSE stream of chunks."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi.responses import JSONResponse, StreamingResponse
from mtpserve.engine.async_engine import EngineDeadError, merged_deltas
from mtpserve.server.logprobs import chat_logprobs, completion_logprobs

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


def request_metrics(stream) -> dict:
    return {"speculative": stream.request.spec_stats.to_dict(), "timings": stream.request.timings()}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(streams, n: int) -> dict:
    prompt = sum(s.request.num_prompt_tokens for s in streams) // n
    completion = sum(s.num_tokens for s in streams)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def respond(body, streams, rid: str, chat: bool, model_name: str, tok):
    """The JSON response, or the SSE stream when ``body.stream``."""
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
            texts = await asyncio.gather(*(s.collect() for s in streams))
        except EngineDeadError as e:
            raise APIError(503, str(e), code="engine_dead") from None
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
        if chat:
            for i in range(len(streams)):
                yield sse(chunk(i, "", first=True))
        async for i, text, end, entries in merged_deltas(streams):
            if isinstance(end, EngineDeadError):
                yield sse({"error": {"message": str(end), "type": "service_unavailable", "param": None,
                                     "code": "engine_dead"}})
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
