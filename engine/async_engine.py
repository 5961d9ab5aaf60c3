"""The engine client the HTTP layer talks to: the engine loop runs in a background thread and
hands each request's outputs to its own asyncio queue; text comes back as deltas with stop
strings applied."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

from mtpserve.engine.busy_log import BusyLog
from mtpserve.engine.detokenizer import IncrementalDetokenizer
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.spec.stats import SpecStats

logger = logging.getLogger(__name__)


class StreamError(MtpserveError):
    """A request ended in an error, not with a finish reason; ``status`` and ``code`` are the
    HTTP answer's."""

    status, code = 500, "internal_error"


class EngineDeadError(StreamError):
    """The engine loop stopped (an exception outside a model step); no request can complete."""

    status, code = 503, "engine_dead"


class RequestFailedError(StreamError):
    """The model step computing this request raised; the engine goes on with the other requests."""


class EngineClient:
    def __init__(self, engine=None, log_interval: float = 5.0, build=None):
        """Give the ``engine``, or ``build``, a function that makes it on the engine thread (the
        engine's errors are raised here). Building it there keeps every torch op on one thread:
        ops on a second thread get a second OpenMP thread pool, and on a 2-core CPU the two pools
        contend (decoding measured at half speed when the model was loaded on the main thread)."""
        if (engine is None) == (build is None):
            raise ValueError("give an engine or a function that builds one")
        self.engine = engine
        self.busy_log = BusyLog(log_interval)
        self.lock = threading.Lock()           # held around every call into the engine
        self.wake = threading.Event()
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.aborts: collections.deque[str] = collections.deque()
        self.error: BaseException | None = None
        self._stopping = False
        self._built = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(build,), name="mtpserve-engine",
                                       daemon=True)
        self.thread.start()
        self._built.wait()
        if self.engine is None:
            raise self.error
        self.tokenizer = self.engine.tokenizer

    @property
    def healthy(self) -> bool:
        return self.error is None and self.thread.is_alive()

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self.wake.set()
        self.thread.join(timeout)

    def _run(self, build) -> None:
        try:
            if build is not None:
                self.engine = build()
        except BaseException as e:  # noqa: BLE001 (re-raised by __init__ on the calling thread)
            self.error = e
            return
        finally:
            self._built.set()
        try:
            while not self._stopping:
                self.wake.clear()
                busy = self._step()
                self.busy_log.maybe_log(self.num_running(), self.num_waiting())
                if not busy:
                    interval = self.busy_log.interval
                    timeout = min(1.0, interval) if interval > 0 else 1.0
                    self.wake.wait(timeout)
        except BaseException as e:
            logger.exception("engine loop failed")
            self.error = e
            for loop, queue in list(self.queues.values()):
                loop.call_soon_threadsafe(queue.put_nowait, e)

    def _step(self) -> bool:
        """Apply pending aborts, run one engine step and hand its outputs to their queues (nothing
        of a finished request is kept here once delivered); False when there was nothing to do."""
        with self.lock:
            while self.aborts:
                request_id = self.aborts.popleft()
                self.engine.abort_request(request_id)
                self.busy_log.forget(request_id)
            busy = self.engine.has_unfinished_requests()
            outputs = self.engine.step() if busy else []
        self.busy_log.observe(outputs)
        for out in outputs:
            target = self.queues.get(out.request_id)
            if target is not None:
                target[0].call_soon_threadsafe(target[1].put_nowait, out)
        return busy

    def _add(self, request_id, prompt_token_ids, params, spec_n_max) -> float:
        """Add the request; its arrival time (the engine's clock)."""
        with self.lock:
            req = self.engine.add_request(request_id, prompt_token_ids, params,
                                          spec_n_max=spec_n_max)
            arrival_time = req.arrival_time
        self.wake.set()
        return arrival_time

    async def start(self, request_id: str, prompt_token_ids: list[int], params,
                    spec_n_max: int | None = None, metrics=None) -> TextStream:
        """Add a request (RequestError for an invalid one) and return the stream of its text."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = (loop, queue)
        try:
            # checked after registering: a loop that dies from here on finds the queue and posts
            # its error
            if not self.healthy:
                raise EngineDeadError("the engine is not running")
            arrival_time = await loop.run_in_executor(None, self._add, request_id,
                                                      prompt_token_ids, params, spec_n_max)
        except BaseException:
            self.queues.pop(request_id, None)
            raise
        return TextStream(self, request_id, prompt_token_ids, params, queue, arrival_time, metrics)

    def abort(self, request_id: str) -> None:
        """Abort from any thread without waiting for the step in progress; the engine frees
        its blocks."""
        self.queues.pop(request_id, None)
        self.aborts.append(request_id)
        self.wake.set()


class TextStream:
    """Text deltas of one request. Stop strings are matched on the decoded text and never
    emitted: the last ``len(longest stop) - 1`` characters are held back until they cannot start a
    stop string. It sees the request only through the value records (RequestOutput) the engine
    thread posts."""

    def __init__(self, client: EngineClient, request_id: str, prompt_token_ids: list[int], params,
                 queue: asyncio.Queue, arrival_time: float, metrics=None):
        self.client = client
        self.request_id = request_id
        self.num_prompt_tokens = len(prompt_token_ids)
        self.arrival_time = arrival_time
        self.queue = queue
        self.stop = [s for s in params.stop if s]
        self.min_tokens = params.min_tokens
        self.keep_stop = params.include_stop_str_in_output
        self.metrics = metrics
        self.detok = IncrementalDetokenizer(client.tokenizer, prompt_token_ids,
                                            params.skip_special_tokens)
        self.stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_token_ids |= set(client.engine.eos_token_ids)
        self.pending = ""
        self.num_tokens = 0       # completion tokens the client got text from
        self.finish_reason: str | None = None
        self.last_token_time: float | None = None
        self.done = False
        self.want_logprobs = params.logprobs is not None
        self.logprobs: list = []  # (token id, (logprob, top-n)) not yet taken by the responder
        self.spec_stats = SpecStats()  # as of the latest output
        self.timings: dict = {}  # as of the latest output
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache

    def _find_stop(self) -> int:
        """Where the pending text ends (-1: no stop string in it); past the stop string when it
        is kept. Nothing is searched before ``min_tokens`` outputs."""
        if self.num_tokens < self.min_tokens:
            return -1
        hits = [(i, len(s)) for i, s in ((self.pending.find(s), s) for s in self.stop) if i >= 0]
        if not hits:
            return -1
        cut, size = min(hits)
        return cut + size if self.keep_stop else cut

    def _text_tokens(self, out) -> list[int]:
        """The tokens whose text the client gets: the EOS or stop token that ended the request
        is left out unless include_stop_str_in_output."""
        ids = out.new_token_ids
        ended_by_token = out.finish_reason == "stop" and ids and ids[-1] in self.stop_token_ids
        if ended_by_token and not self.keep_stop:
            return ids[:-1]
        return ids

    def _observe(self, count: int) -> None:
        now = time.perf_counter()
        if self.metrics is not None and count:
            gap = None if self.last_token_time is None else now - self.last_token_time
            self.metrics.on_tokens(count, gap)
        if count:
            self.last_token_time = now

    async def deltas(self):
        """Yield text deltas (maybe empty) until the request finishes; then
        ``finish_reason`` is set."""
        hold = max((len(s) for s in self.stop), default=1) - 1
        try:
            while self.finish_reason is None:
                out = await self.queue.get()
                if isinstance(out, BaseException):
                    raise EngineDeadError("the engine stopped after an internal error")
                self.spec_stats, self.timings = out.spec_stats, out.timings
                self.num_cached_tokens = out.num_cached_tokens
                if out.finish_reason == "error":
                    self._end("error")
                    raise RequestFailedError("the model step computing this request failed")
                if self.want_logprobs:
                    self.logprobs.extend(zip(out.new_token_ids, out.new_logprobs))
                self.num_tokens += len(out.new_token_ids)
                self._observe(len(out.new_token_ids))
                self.pending += self.detok.add(self._text_tokens(out))
                if out.finished:
                    self.pending += self.detok.flush()
                cut = self._find_stop()
                if cut >= 0:
                    text, self.pending, self.finish_reason = self.pending[:cut], "", "stop"
                    if not out.finished:
                        self.client.abort(self.request_id)
                elif out.finished:
                    text, self.pending, self.finish_reason = self.pending, "", out.finish_reason
                elif self.num_tokens < self.min_tokens:
                    text, self.pending = self.pending, ""
                else:
                    keep = len(self.pending) - hold if hold else len(self.pending)
                    text, self.pending = self.pending[:max(keep, 0)], self.pending[max(keep, 0):]
                yield text
            self.done = True
            if self.metrics is not None:
                self.metrics.on_finish(self, self.finish_reason)
        finally:
            self.close()

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        if self.metrics is not None:
            self.metrics.on_finish(self, reason)

    def close(self) -> None:
        """Abort the request if it has not finished (client gone); idempotent."""
        if self.finish_reason is None:
            self._end("abort")
            self.client.abort(self.request_id)
        self.client.queues.pop(self.request_id, None)

    def take_logprobs(self) -> list:
        """The logprob entries gathered since the last call."""
        taken, self.logprobs = self.logprobs, []
        return taken

    async def collect(self) -> str:
        return "".join([text async for text in self.deltas()])


async def merged_deltas(streams):
    """(choice index, text, None, logprob entries) per delta and (index, None, finish_reason or
    exception, []) at each end."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for text in s.deltas():
                await queue.put((i, text, None, s.take_logprobs()))
            await queue.put((i, None, s.finish_reason, []))
        except StreamError as e:
            await queue.put((i, None, e, []))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            item = await queue.get()
            left -= item[2] is not None
            yield item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()
