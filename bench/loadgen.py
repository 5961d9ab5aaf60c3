"""A load generator for the reliability tests and ``mtpserve stress``: many concurrent streaming and
non-streaming requests (chat and completions, mixed prompt lengths, greedy and sampled, MTP on and
off, logprobs), a share of whose clients disconnect at random points. Each answer is checked as it
arrives:

- a stream is SSE: every event JSON, one finish reason per choice and nothing after it, then the
  usage chunk and ``[DONE]`` (or an error chunk, counted as an error);
- token accounting: with logprobs, the tokens across chunks / in the body equal
  ``usage.completion_tokens``, and a choice that ends with ``length`` below the context limit has
  exactly ``max_tokens`` of them;
- greedy text equals ``expected(job)`` when the caller gives one (an independent reference: a
  difference is an error); without one it is compared with the first answer seen for the same
  prompt and length, and differences are counted apart (``greedy_mismatches``), since float32
  batches of other sizes may flip a near-tied argmax.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field

import httpx

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
         "wizards", "judge", "boxing", "at", "dawn;", "numbers", "0", "7", "42", "1000,", "def",
         "f(x):", "return", "x", "*", "2,", "café", "naïve", "東京", "🙂", "\n")


@dataclass
class Job:
    index: int
    path: str
    body: dict
    prompt_key: int          # index into the prompt pool
    # stream: events read before disconnecting; non-stream: seconds
    abort_after: float | None = None

    @property
    def greedy(self) -> bool:
        return self.body.get("temperature") == 0


@dataclass
class LoadReport:
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    errors: list[str] = field(default_factory=list)
    greedy_checked: int = 0
    greedy_mismatches: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "aborted": self.aborted,
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "greedy_checked": self.greedy_checked,
            "greedy_mismatches": self.greedy_mismatches,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "seconds": round(self.seconds, 1),
        }


def prompt_pool(count: int, seed: int = 0, max_words: int = 120) -> list[str]:
    """Prompts of mixed lengths (1 to ``max_words`` words, short ones more often)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, int(max_words * rng.random() ** 2))))
            for _ in range(count)]


def fit_prompt(prompt: str, tokenizer, max_tokens: int) -> str:
    """``prompt`` cut at word boundaries (halving) until it has at most ``max_tokens`` tokens."""
    words = prompt.split(" ")
    while len(words) > 1 and len(tokenizer.encode(" ".join(words))) > max_tokens:
        words = words[:len(words) // 2]
    return " ".join(words)


def rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc), or None where that is not available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def engine_state(client) -> dict:
    """What must all be zero once every request has ended: nothing left in the scheduler, the KV
    block pool, the engine's request table or the client's output queues."""
    engine = client.engine
    with client.lock:
        return {
            "running": client.num_running(),
            "waiting": client.num_waiting(),
            "used_blocks": engine.kv.pool.num_blocks - engine.kv.num_free_blocks,
            "block_tables": len(engine.kv.block_tables),
            "live_requests": len(engine.requests),
            "open_queues": len(client.queues),
        }


def wait_idle(client, timeout: float = 30.0) -> dict:
    """Poll ``engine_state`` until it is all zero
    (aborts are processed asynchronously) or ``timeout``."""
    deadline = time.perf_counter() + timeout
    state = engine_state(client)
    while any(state.values()) and time.perf_counter() < deadline:
        time.sleep(0.05)
        state = engine_state(client)
    return state


def make_jobs(prompts: list[str], count: int, seed: int = 0, abort_fraction: float = 0.2,
              max_tokens: int = 32, start: int = 0) -> list[Job]:
    """``count`` random jobs over the prompt pool (deterministic for a seed)."""
    rng = random.Random(seed)
    jobs = []
    for index in range(start, start + count):
        key = rng.randrange(len(prompts))
        chat = rng.random() < 0.5
        body: dict = {"max_tokens": rng.randint(1, max_tokens), "stream": rng.random() < 0.6,
                      "stream_options": {"include_usage": True}}
        if chat:
            body["messages"] = [{"role": "user", "content": prompts[key]}]
        else:
            body["prompt"] = prompts[key]
        if not body["stream"]:
            body.pop("stream_options")
        body["n"] = rng.choice([1, 1, 1, 2])
        if rng.random() < 0.5:
            body.update(temperature=0, ignore_eos=True)
        else:
            body.update(temperature=rng.uniform(0.5, 1.2), top_p=rng.choice([1.0, 0.9]),
                        top_k=rng.choice([0, 20]), ignore_eos=rng.random() < 0.5)
            if rng.random() < 0.5:
                body["seed"] = rng.randrange(1 << 30)
        if rng.random() < 0.3:
            body["speculative"] = {"enabled": False}
        if rng.random() < 0.3:
            if chat:
                body["logprobs"] = True
                body["top_logprobs"] = rng.randint(0, 2)
            else:
                body["logprobs"] = rng.randint(0, 2)
        abort = None
        if rng.random() < abort_fraction:
            abort = float(rng.randint(0, 6)) if body["stream"] else rng.uniform(0.0, 0.3)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        jobs.append(Job(index, path, body, key, abort))
    return jobs


def choice_text(choice: dict, chat: bool, stream: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    if stream:
        message = choice.get("delta")
    else:
        message = choice.get("message") or {}
    return message.get("content") or ""


def choice_tokens(choice: dict, chat: bool) -> int:
    lp = choice.get("logprobs")
    if not lp:
        return 0
    if chat:
        return len(lp.get("content") or [])
    return len(lp.get("tokens") or [])


class Checker:
    """Checks answers against the rules of the module docstring; ``expected(job) -> str | None``."""

    def __init__(self, report: LoadReport, max_model_len: int, expected=None):
        self.report = report
        self.max_model_len = max_model_len
        self.expected = expected
        self.first_greedy: dict[tuple, str] = {}

    def fail(self, job: Job, message: str) -> None:
        self.report.errors.append(f"job {job.index} ({job.path}, "
                                  f"stream={job.body['stream']}): {message}")

    def check(self, job: Job, texts: dict, finish: dict, tokens: dict, usage: dict | None) -> None:
        body = job.body
        n = body.get("n", 1)
        chat = job.path.endswith("chat/completions")
        reasons_ok = all(r in ("stop", "length") for r in finish.values())
        if sorted(finish) != list(range(n)) or not reasons_ok:
            return self.fail(job, f"finish reasons {finish}")
        if usage is None:
            return self.fail(job, "no usage")
        total = usage["completion_tokens"]
        max_tokens = body["max_tokens"]
        if total > n * max_tokens:
            return self.fail(job, f"{total} completion tokens for max_tokens {max_tokens} x {n}")
        if "logprobs" in body and sum(tokens.values()) != total:
            message = f"{sum(tokens.values())} tokens in the logprobs but usage says {total}"
            return self.fail(job, message)
        bounded = usage["prompt_tokens"] + max_tokens < self.max_model_len
        all_length = all(r == "length" for r in finish.values())
        if bounded and all_length and total != n * max_tokens:
            message = f"finish 'length' after {total} tokens, max_tokens {max_tokens} x {n}"
            return self.fail(job, message)
        if job.greedy:
            self.check_greedy(job, chat, texts)
        self.report.completed += 1

    def check_greedy(self, job: Job, chat: bool, texts: dict) -> None:
        key = (chat, job.prompt_key, job.body["max_tokens"])
        if self.expected:
            want = self.expected(job)
        else:
            want = self.first_greedy.setdefault(key, texts[0])
        if want is None:
            return
        self.report.greedy_checked += 1
        if any(t != want for t in texts.values()):
            if self.expected is None:
                self.report.greedy_mismatches += 1
            else:
                self.fail(job, f"greedy text {texts} differs from {want!r}")


def count_status(report: LoadReport, status: int) -> None:
    report.status_counts[status] = report.status_counts.get(status, 0) + 1


async def run_job(client: httpx.AsyncClient, job: Job, checker: Checker) -> None:
    if job.body["stream"]:
        await run_stream_job(client, job, checker)
    else:
        await run_plain_job(client, job, checker)


async def run_plain_job(client: httpx.AsyncClient, job: Job, checker: Checker) -> None:
    """A non-stream request, abandoned after ``job.abort_after`` seconds when set."""
    report = checker.report
    chat = job.path.endswith("chat/completions")
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    tokens: dict[int, int] = {}
    try:
        r = await asyncio.wait_for(client.post(job.path, json=job.body), job.abort_after)
    except asyncio.TimeoutError:
        report.aborted += 1
        return
    count_status(report, r.status_code)
    if r.status_code != 200:
        return checker.fail(job, f"status {r.status_code}: {r.text[:200]}")
    out = r.json()
    for c in out["choices"]:
        i = c["index"]
        texts[i] = choice_text(c, chat, False)
        finish[i] = c["finish_reason"]
        tokens[i] = choice_tokens(c, chat)
    checker.check(job, texts, finish, tokens, out.get("usage"))


async def run_stream_job(client: httpx.AsyncClient, job: Job, checker: Checker) -> None:
    """A stream request, disconnected after ``job.abort_after`` events when set."""
    report = checker.report
    chat = job.path.endswith("chat/completions")
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    tokens: dict[int, int] = {}
    usage = None
    events = 0
    done = False
    async with client.stream("POST", job.path, json=job.body) as r:
        count_status(report, r.status_code)
        if r.status_code != 200:
            return checker.fail(job, f"status {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line:
                continue
            if job.abort_after is not None and events >= job.abort_after:
                report.aborted += 1
                return  # leaving the block closes the connection mid-stream
            events += 1
            if done or not line.startswith("data: "):
                after = " after [DONE]" if done else ""
                return checker.fail(job, f"unexpected line {line[:100]!r}{after}")
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return checker.fail(job, f"error chunk {event['error']}")
            if event.get("usage"):
                usage = event["usage"]
            for c in event["choices"]:
                i = c["index"]
                if i in finish:
                    return checker.fail(job, f"a chunk for choice {i} after its finish reason")
                texts[i] = texts.get(i, "") + choice_text(c, chat, True)
                tokens[i] = tokens.get(i, 0) + choice_tokens(c, chat)
                if c.get("finish_reason"):
                    finish[i] = c["finish_reason"]
    if not done:
        return checker.fail(job, "the stream ended without [DONE]")
    checker.check(job, texts, finish, tokens, usage)


async def run_load(base_url: str, jobs: list[Job], concurrency: int, checker: Checker,
                   headers: dict | None = None, deadline: float | None = None) -> LoadReport:
    """Run the jobs with at most ``concurrency`` in flight
    (stopping early at ``deadline``, a perf_counter)."""
    report = checker.report
    start = time.perf_counter()
    queue = list(reversed(jobs))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue and (deadline is None or time.perf_counter() < deadline):
            job = queue.pop()
            report.requests += 1
            try:
                await run_job(client, job, checker)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as e:
                checker.fail(job, f"{type(e).__name__}: {e}")

    client = httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits, headers=headers)
    async with client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    report.seconds += time.perf_counter() - start
    return report
