"""Load, aborts and cache pressure on a live loopback server (tiny float64 Llama with a random MTP head, so drafts
are proposed and mostly rejected). Greedy answers are compared with transformers' own greedy decoding of the same
checkpoint; afterwards nothing may be left: no running or waiting request, no used KV block, no live Request
object, and the process memory back near where it was."""

from __future__ import annotations

import asyncio
import gc
import json
import time

import httpx
import pytest
import torch
from conftest import load_reference_model
from mtp_helpers import save_random_head
from test_server import scrape

from mtpserve.bench.loadgen import Checker, LoadReport, make_jobs, prompt_pool, rss_bytes, run_load, wait_idle
from mtpserve.engine.async_engine import EngineClient
from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.request import Request
from mtpserve.server.app import build_app
from mtpserve.server.background import serve_in_background

MODEL = "tiny"
MAX_TOKENS = 32
# RSS may grow this much over the measured run. It grows about 10 MiB here while allocator arenas and torch's CPU
# caches settle after the short warm-up round, then stays flat over further rounds. A leak of what a request holds
# (token lists, an output queue; KV blocks are preallocated) shows in the live-object and block checks long before
# it could move RSS this far; this bound is for gross leaks (e.g. tensors kept per step).
RSS_TOLERANCE = 32 << 20


class Reference:
    """Greedy continuations by transformers (float64, the full sequence each step, no cache, the checkpoint's
    repetition penalty as the server applies it by default) of the prompts as transformers' tokenizer and chat
    template render them; texts decoded by transformers."""

    def __init__(self, path: str, prompts: list[str], length: int = MAX_TOKENS):
        from transformers import AutoTokenizer, GenerationConfig, RepetitionPenaltyLogitsProcessor

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = load_reference_model(path).double()
        self.penalty = RepetitionPenaltyLogitsProcessor(GenerationConfig.from_pretrained(path).repetition_penalty)
        self.prompts, self.length = prompts, length
        self.ids: dict[tuple[bool, int], list[int]] = {}

    def prompt_ids(self, chat: bool, key: int) -> list[int]:
        if chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": self.prompts[key]}],
                                                add_generation_prompt=True, tokenize=False)
            return self.tok(text, add_special_tokens=False).input_ids
        return self.tok(self.prompts[key]).input_ids

    @torch.no_grad()
    def continuation(self, chat: bool, key: int, max_tokens: int) -> list[int]:
        assert max_tokens <= self.length
        if (chat, key) not in self.ids:
            ids = torch.tensor([self.prompt_ids(chat, key)])
            for _ in range(self.length):
                scores = self.penalty(ids, self.model(ids).logits[:, -1])
                ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
            self.ids[(chat, key)] = ids[0, -self.length:].tolist()
        return self.ids[(chat, key)][:max_tokens]

    def expected(self, job) -> str:
        chat = job.path.endswith("chat/completions")
        return self.tok.decode(self.continuation(chat, job.prompt_key, job.body["max_tokens"]),
                               skip_special_tokens=True)


def make_client(path, head, **config) -> EngineClient:
    engine = LLMEngine(load_checkpoint(path), EngineConfig(block_size=16, spec_adaptive=False, mtp_head=head,
                                                           dtype=torch.float64, **config))
    return EngineClient(engine, log_interval=0)


@pytest.fixture(scope="module")
def head(tiny_llama_dir, tmp_path_factory):
    return save_random_head(tmp_path_factory.mktemp("head"), load_checkpoint(tiny_llama_dir).config)


def live_request_objects() -> int:
    gc.collect()
    return sum(isinstance(o, Request) for o in gc.get_objects())


def test_load_with_random_disconnects(tiny_llama_dir, head):
    prompts = prompt_pool(8, seed=3, max_words=40)
    reference = Reference(tiny_llama_dir, prompts)
    client = make_client(tiny_llama_dir, head, num_blocks=96, max_num_seqs=32)
    try:
        with serve_in_background(build_app(client, MODEL)) as url:
            def load(count: int, seed: int) -> LoadReport:
                checker = Checker(LoadReport(), client.engine.max_model_len, reference.expected)
                return asyncio.run(run_load(url, make_jobs(prompts, count, seed=seed, max_tokens=MAX_TOKENS), 32,
                                            checker))

            warm = load(40, seed=1)
            assert warm.errors == []
            assert not any(wait_idle(client).values())
            before = live_request_objects(), rss_bytes()
            report = load(200, seed=2)
            state = wait_idle(client)
            after = live_request_objects(), rss_bytes()
            with httpx.Client(base_url=url) as http:
                metrics = scrape(http)
        assert report.errors == [], report.errors[:5]
        assert report.requests == 200 and report.completed + report.aborted == 200
        assert report.aborted >= 20 and report.completed >= 120 and report.greedy_checked >= 40
        assert state == dict.fromkeys(state, 0)
        assert metrics["mtpserve_requests_running"] == 0 and metrics["mtpserve_requests_waiting"] == 0
        assert metrics["mtpserve_kv_cache_usage_ratio"] == 0
        assert metrics["mtpserve_request_success_total,finished_reason=abort"] > 0
        assert metrics["mtpserve_request_success_total,finished_reason=error"] == 0
        assert before[0] == after[0] == 0
        if before[1] is not None:
            assert after[1] - before[1] < RSS_TOLERANCE, (before[1] >> 20, after[1] >> 20)
    finally:
        client.shutdown()


def test_cache_pressure_preempts_and_resumes(tiny_llama_dir, head):
    prompts = prompt_pool(6, seed=5, max_words=12)
    reference = Reference(tiny_llama_dir, prompts, length=80)
    client = make_client(tiny_llama_dir, head, num_blocks=8)  # 128 tokens: one long generation at a time
    max_len = client.engine.max_model_len
    assert max_len == 128
    try:
        with serve_in_background(build_app(client, MODEL)) as url:
            async def go():
                async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                    bodies = [{"prompt": p, "max_tokens": 80, "temperature": 0, "ignore_eos": True,
                               "stream": i % 2 == 0} for i, p in enumerate(prompts)]
                    return bodies, await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))

            bodies, answers = asyncio.run(go())
            with httpx.Client(base_url=url, timeout=30) as http:
                metrics = scrape(http)
                ids = http.post("/tokenize", json={"prompt": "word " * 200}).json()["tokens"]
                at_limit = http.post("/v1/completions", json={"prompt": ids[:max_len], "max_tokens": 5})
                fits = http.post("/v1/completions", json={"prompt": ids[:max_len - 1], "max_tokens": 5})
                never = http.post("/v1/completions", json={"prompt": ids[:max_len + 1], "max_tokens": 5,
                                                           "stream": True})
        for key, (body, r) in enumerate(zip(bodies, answers)):
            assert r.status_code == 200
            if body["stream"]:
                events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: {")]
                text = "".join(json.loads(e)["choices"][0]["text"] for e in events)
            else:
                text = r.json()["choices"][0]["text"]
            reference_text = reference.tok.decode(reference.continuation(False, key, 80), skip_special_tokens=True)
            assert text == reference_text, key
        assert client.engine.scheduler.num_preemptions > 0
        assert metrics["mtpserve_preemptions_total"] == client.engine.scheduler.num_preemptions
        for r in (at_limit, never):
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 1
        assert not any(wait_idle(client).values())
    finally:
        client.shutdown()


def test_stress_command(tiny_llama_dir, head, capsys):
    from mtpserve.cli.main import main

    code = main(["stress", "--model", tiny_llama_dir, "--mtp-head", head, "--spec-adaptive", "off", "--device", "cpu",
                 "--num-blocks", "48", "--requests", "40", "--concurrency", "8", "--max-tokens", "16", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["requests"] == 40 and report["errors"] == 0 and report["leaked_blocks"] == 0
    assert report["completed"] + report["aborted"] == 40 and report["rss_mib_after"] is not None


def test_non_stream_disconnect_aborts(tiny_llama_dir, head, monkeypatch):
    client = make_client(tiny_llama_dir, head, num_blocks=32)
    execute = client.engine.runner.execute

    def slow(out):  # 250 steps take seconds: the client is gone long before the answer is ready
        time.sleep(0.02)
        return execute(out)

    monkeypatch.setattr(client.engine.runner, "execute", slow)
    body = {"prompt": "Once upon a time", "max_tokens": 250, "temperature": 0, "ignore_eos": True}
    try:
        with serve_in_background(build_app(client, MODEL)) as url:
            async def leave_early():
                async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(c.post("/v1/completions", json=body), 0.5)

            start = time.perf_counter()
            asyncio.run(leave_early())
            assert not any(wait_idle(client, timeout=3).values())
            assert time.perf_counter() - start < 3  # aborted, not run to its end (250 x 20 ms)
            with httpx.Client(base_url=url) as http:
                assert scrape(http)["mtpserve_request_success_total,finished_reason=abort"] == 1
    finally:
        client.shutdown()


def test_text_held_back_is_flushed_at_the_end(tiny_llama_dir):
    """A request that ends inside a character (or right after a stop-string candidate) loses no text: the pieces
    add up to the tokenizer's own decode of all the tokens, U+FFFD for the unfinished character included."""
    from tokenizers import Tokenizer

    from mtpserve.engine.detokenizer import IncrementalDetokenizer

    reference = Tokenizer.from_file(f"{tiny_llama_dir}/tokenizer.json")
    tok = load_checkpoint(tiny_llama_dir).tokenizer
    ids = reference.encode("ok 東京 café").ids
    for end in range(1, len(ids) + 1):
        detok = IncrementalDetokenizer(tok, [])
        text = "".join(detok.add([t]) for t in ids[:end]) + detok.flush()
        assert text == reference.decode(ids[:end]), end
