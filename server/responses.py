"""Completion answers: the JSON body of a non-stream request and
the SSE stream of chunks (the error envelope is errors.py's)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from fastapi.responses import JSONResponse, Response, StreamingResponse

from mtpserve.engine.async_engine import StreamError, merged_deltas
from mtpserve.server.chat_output import ChatOutput, OutputSpec, finish_reason, merge, message
from mtpserve.server.errors import error_body
from mtpserve.server.logprobs import LogprobsFormatter

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see the stream alive
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def head(rid: str, kind: str, model_name: str) -> dict:
    """The fields every completion body and chunk starts with."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name}


def request_metrics(stream) -> dict:
    return {"speculative": stream.spec_stats.to_dict(), "timings": stream.timings}


def usage(streams, n: int) -> dict:
    """Token counts of the request; its ``n`` choices share one prompt, counted once per prompt.
    ``cached_tokens``: per prompt, the fewest prompt tokens any of its choices found in the prefix
    cache (the first choice to start computes what the others then reuse)."""
    prompt = sum(s.num_prompt_tokens for s in streams) // n
    completion = sum(s.num_tokens for s in streams)
    cached = 0
    for first in range(0, len(streams), n):
        cached += min(s.num_cached_tokens for s in streams[first:first + n])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def with_usage(out: dict, streams, n: int) -> dict:
    """``out`` with the usage block; with one choice also
    the request's metrics (else each choice has its own)."""
    out["usage"] = usage(streams, n)
    if len(streams) == 1:
        out["metrics"] = request_metrics(streams[0])
    return out


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def retrieve_exception(future) -> None:
    """Read a finished future's exception so asyncio does not report it as never retrieved."""
    if not future.cancelled():
        future.exception()


async def collect_all(streams, disconnected=None) -> list[str] | None:
    """Every stream's full text; None when ``disconnected()`` (the client went away) returns first,
    and then the streams are aborted, freeing their KV blocks."""
    gathered = asyncio.ensure_future(asyncio.gather(*(s.collect() for s in streams)))
    watch = None
    if disconnected is not None:
        watch = asyncio.ensure_future(disconnected())

    def abandon() -> None:
        gathered.cancel()
        gathered.add_done_callback(retrieve_exception)
        for s in streams:
            s.close()

    waited = [gathered]
    if watch is not None:
        waited.append(watch)
    try:
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
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


def json_choice(i: int, stream, text: str, spec: OutputSpec | None, logprobs: LogprobsFormatter,
                own_metrics: bool) -> dict:
    choice = {
        "index": i,
        "logprobs": logprobs.format(i, stream.take_logprobs()),
        "finish_reason": stream.finish_reason,
    }
    if spec is not None:
        output = ChatOutput(spec)
        choice["message"] = message(spec, merge(output.feed(text), output.finish()))
        choice["finish_reason"] = finish_reason(output, stream.finish_reason)
    else:
        choice["text"] = text
    if own_metrics:
        choice["metrics"] = request_metrics(stream)
    return choice


async def json_response(body, streams, rid: str, spec: OutputSpec | None, model_name: str, tok,
                        disconnected=None) -> Response:
    """The whole completion as one JSON body (``spec``: how a chat answer is read, None for a
    completion). ``disconnected``: an awaitable factory that returns when the client has gone;
    the request is then aborted. A stream that ended in an error raises its StreamError."""
    chat = spec is not None
    kind = "chat.completion" if chat else "text_completion"
    out = head(rid, kind, model_name)  # created: when the request started
    texts = await collect_all(streams, disconnected)
    if texts is None:
        return Response(status_code=499)  # nobody reads it: the client has gone
    logprobs = LogprobsFormatter(tok, chat, streams)
    choices = []
    for i, stream in enumerate(streams):
        choices.append(json_choice(i, stream, texts[i], spec, logprobs, len(streams) > 1))
    out["choices"] = choices
    return JSONResponse(with_usage(out, streams, body.n))


def chunk(head_fields: dict, chat: bool, i: int, text, logprobs=None, finish=None) -> dict:
    """``text``: a chat chunk's delta dict, or a completion chunk's text."""
    if chat:
        choice = {"index": i, "delta": text, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return {**head_fields, "choices": [choice]}


class ChunkMaker:
    """The chunks of one stream: each chat choice's text read through its ChatOutput, the usage
    so far on every chunk with ``continuous_usage_stats``."""

    def __init__(self, streams, head_fields: dict, spec: OutputSpec | None, n: int,
                 continuous_usage: bool):
        self.streams = streams
        self.head_fields = head_fields
        self.chat = spec is not None
        self.outputs = [ChatOutput(spec) for _ in streams] if self.chat else []
        self.n = n
        self.continuous_usage = continuous_usage

    def make(self, i: int, text, logprobs=None, finish=None) -> str:
        out = chunk(self.head_fields, self.chat, i, text, logprobs, finish)
        if self.continuous_usage:
            out["usage"] = usage(self.streams, self.n)
        return sse(out)

    def first(self, i: int) -> str:
        """A chat choice's first chunk: the role."""
        return self.make(i, {"role": "assistant", "content": ""})

    def delta(self, i: int, text: str, logprobs) -> str | None:
        if self.chat:
            text = self.outputs[i].feed(text)
        if text or logprobs:
            return self.make(i, text, logprobs)
        return None

    def last(self, i: int, end: str) -> list[str]:
        """A chat choice's held-back text, then the choice's final chunk with its metrics."""
        events = []
        if self.chat:
            rest = self.outputs[i].finish()
            if rest:
                events.append(self.make(i, rest))
            end = finish_reason(self.outputs[i], end)
        final = chunk(self.head_fields, self.chat, i, {} if self.chat else "", finish=end)
        final["metrics"] = request_metrics(self.streams[i])
        if self.continuous_usage:
            final["usage"] = usage(self.streams, self.n)
        events.append(sse(final))
        return events


async def chunk_events(streams, maker: ChunkMaker, logprobs: LogprobsFormatter,
                       include_usage: bool, n: int):
    """A role chunk per chat choice, the deltas, a final chunk per choice (with its metrics), the
    usage chunk when asked for, then [DONE]; a stream that ended in an error ends them all with an
    error chunk."""
    if maker.chat:
        for i in range(len(streams)):
            yield maker.first(i)
    async for i, text, end, entries in merged_deltas(streams):
        if isinstance(end, StreamError):
            yield sse(error_body(end.status, str(end), code=end.code))
            yield DONE
            return
        if end is None:
            lp = None
            if entries:
                lp = logprobs.format(i, entries)
            event = maker.delta(i, text, lp)
            if event is not None:
                yield event
            continue
        for event in maker.last(i, end):
            yield event
    if include_usage:
        yield sse(with_usage({**maker.head_fields, "choices": []}, streams, n))
    yield DONE


async def with_keepalive(events, interval: float):
    """``events``, with a keep-alive comment after every ``interval`` seconds without one (a long
    prompt's prefill); ``interval`` 0 sends none."""
    if interval <= 0:
        async for event in events:
            yield event
        return
    pending = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait([pending], timeout=interval)
            if not done:
                yield KEEPALIVE
                continue
            pending = None
            try:
                event = done.pop().result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:
            pending.cancel()
            pending.add_done_callback(retrieve_exception)
            await asyncio.wait([pending])
        await events.aclose()


async def guarded(events, rid: str):
    """``events``, closed when the client goes; a crash ends the stream with an error chunk and
    [DONE], so a stream always ends with a finish reason or an error."""
    try:
        async with contextlib.aclosing(events) as inner:
            async for event in inner:
                yield event
    except Exception:
        logger.exception("stream %s failed", rid)
        yield sse(error_body(500, "internal error", code="internal_error"))
        yield DONE


def sse_response(body, streams, rid: str, spec: OutputSpec | None, model_name: str, tok,
                 keepalive: float = 0.0) -> StreamingResponse:
    """The completion as an SSE stream of chunks (the client going away is noticed by the stream
    itself); a keep-alive comment after every ``keepalive`` seconds of silence."""
    chat = spec is not None
    kind = "chat.completion.chunk" if chat else "text_completion"
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous_usage = bool(options and options.continuous_usage_stats)
    logprobs = LogprobsFormatter(tok, chat, streams)
    head_fields = head(rid, kind, model_name)
    maker = ChunkMaker(streams, head_fields, spec, body.n, continuous_usage)
    events = chunk_events(streams, maker, logprobs, include_usage, body.n)
    return StreamingResponse(with_keepalive(guarded(events, rid), keepalive),
                             media_type="text/event-stream", headers=SSE_HEADERS)
