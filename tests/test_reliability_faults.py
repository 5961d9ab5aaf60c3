"""Faults. A model step that raises fails only the requests in that step (a 500 envelope, or an error chunk in a
stream) and the engine goes on serving; a dead engine loop turns /health 503 and ends every waiting client with an
error instead of a hang; a killed server restarts on the same port with nothing cleaned up by hand. Faults are
injected by patching the engine from the test (requests carrying a marker seed), never through a production flag."""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import httpx
import pytest
import yaml
from mtp_helpers import save_random_head
from server_helpers import start_server, wait_healthy
from test_server import free_port, scrape

from mtpserve.bench.loadgen import wait_idle
from mtpserve.engine.async_engine import EngineClient
from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.server.app import build_app
from mtpserve.server.background import serve_in_background

MARKER_SEED = 990_001
GREEDY = {"temperature": 0, "ignore_eos": True}


def sse_data(text: str) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in text.split("\n\n") if line.startswith("data: ")]


@pytest.fixture
def client(tiny_llama_dir, tmp_path):
    checkpoint = load_checkpoint(tiny_llama_dir)
    head = save_random_head(tmp_path / "head", checkpoint.config)
    engine = LLMEngine(checkpoint, EngineConfig(num_blocks=64, block_size=16, max_num_seqs=4, spec_adaptive=False,
                                                mtp_head=head))
    c = EngineClient(engine, log_interval=0)
    yield c
    c.shutdown()


def poison_marked_steps(engine, monkeypatch) -> None:
    """The runner raises for any step that carries a request with the marker seed."""
    execute = engine.runner.execute

    def failing(out):
        if any(s.request.sampling_params.seed == MARKER_SEED for s in out.scheduled):
            raise RuntimeError("injected model-step fault")
        return execute(out)

    monkeypatch.setattr(engine.runner, "execute", failing)


def test_step_fault_fails_only_its_requests(client, monkeypatch):
    normal = {"prompt": "Once upon a time", "max_tokens": 40, **GREEDY}
    marked = {**normal, "temperature": 1.0, "seed": MARKER_SEED}
    with serve_in_background(build_app(client, "tiny")) as url, httpx.Client(base_url=url, timeout=60) as http:
        expected = http.post("/v1/completions", json=normal).json()["choices"][0]["text"]
        poison_marked_steps(client.engine, monkeypatch)
        r = http.post("/v1/completions", json=marked)
        assert r.status_code == 500 and r.json()["error"] == {
            "message": "the model step computing this request failed", "type": "server_error", "param": None,
            "code": "internal_error"}
        events = sse_data(http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "stream": True, "seed": MARKER_SEED}).text)
        assert events[-2]["error"]["code"] == "internal_error" and events[-1] == "[DONE]"
        assert not any(e != "[DONE]" and "error" not in e and e["choices"][0]["finish_reason"] for e in events)

        async def crowd():  # 8 normal streams (4 run, 4 wait: max_num_seqs 4) and a marked one behind them
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                async def stream(body):
                    return sse_data((await c.post("/v1/completions", json={**body, "stream": True})).text)
                tasks = [asyncio.create_task(stream(normal)) for _ in range(8)]
                await asyncio.sleep(0.05)
                return await asyncio.gather(*tasks, stream(marked))

        *normals, bad = asyncio.run(crowd())
        assert "error" in bad[-2] and bad[-1] == "[DONE]"
        texts = ["".join(e["choices"][0]["text"] for e in events[:-1] if "choices" in e) for events in normals]
        failed = ["error" in events[-2] for events in normals]
        assert not all(failed)  # requests outside the failing step completed...
        assert all(t == expected for t, f in zip(texts, failed) if not f)  # ...correctly
        assert not any(wait_idle(client).values()) and client.healthy
        assert http.get("/health").status_code == 200
        assert http.post("/v1/completions", json=normal).json()["choices"][0]["text"] == expected
        assert scrape(http)["mtpserve_request_success_total,finished_reason=error"] >= 3


def test_engine_loop_death_ends_waiting_clients(client, monkeypatch):
    boom = threading.Event()
    schedule = client.engine.scheduler.schedule

    def dying():
        if boom.is_set():
            raise RuntimeError("injected engine-loop fault")
        return schedule()

    monkeypatch.setattr(client.engine.scheduler, "schedule", dying)
    body = {"prompt": "Once upon a time", "max_tokens": 200, **GREEDY}

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                lines = r.aiter_lines()
                first = await anext(lines)
                waiting = asyncio.create_task(c.post("/v1/completions", json=body))
                await asyncio.sleep(0.05)
                boom.set()
                rest = [line async for line in lines if line]
            return first, rest, await waiting, await c.get("/health"), await c.post("/v1/completions", json=body)

    with serve_in_background(build_app(client, "tiny")) as url:
        first, rest, waiting, health, after = asyncio.run(asyncio.wait_for(go(url), 30))
    assert first.startswith("data: {")
    assert json.loads(rest[-2][6:])["error"]["code"] == "engine_dead" and rest[-1] == "data: [DONE]"
    for r in (waiting, health, after):
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


def test_restart_after_kill_needs_no_cleanup(tiny_llama_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"model": tiny_llama_dir, "port": port, "device": "cpu", "num_blocks": 64,
                                      "served-model-name": "tiny", "log_interval": 0}))
    log = tmp_path / "server.log"
    body = {"prompt": "Once upon a time", "max_tokens": 300, "stream": True, **GREEDY}
    first = start_server(config, log, cwd=workdir)
    second = None
    try:
        wait_healthy(url, first)
        with httpx.Client(base_url=url, timeout=10) as c, c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            first.kill()
            first.wait(10)
            with pytest.raises(httpx.TransportError):  # the client learns at once; it does not hang
                for _ in lines:
                    pass
        second = start_server(config, log, cwd=workdir)  # same port, same files, straight away
        wait_healthy(url, second)
        ok = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        big = httpx.get(url + "/v1/models", headers={"x-filler": "y" * (20 << 10)}, timeout=10)
        assert big.status_code == 431 and big.json()["error"]["code"] == "headers_too_large"
        try:  # beyond the parser's cap: refused before the app, the connection closed
            huge = httpx.get(url + "/v1/models", headers={"x-filler": "y" * (200 << 10)}, timeout=10)
            assert 400 <= huge.status_code < 500
        except httpx.TransportError:
            pass
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
        assert list(workdir.iterdir()) == []  # no pid, lock or socket file left behind
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_engine_is_built_on_the_thread_that_steps_it(tiny_llama_dir):
    """Every torch op of the server's engine runs on one thread (see EngineClient): it is built there,
    it serves requests, and an error while building is raised to the caller."""
    from mtpserve.engine.errors import ModelLoadError
    from mtpserve.engine.sampling_params import SamplingParams

    built_on = []

    def build():
        built_on.append(threading.current_thread())
        return LLMEngine(load_checkpoint(tiny_llama_dir), EngineConfig(num_blocks=16, block_size=16))

    client = EngineClient(build=build, log_interval=0)
    try:
        assert built_on == [client.thread] and client.engine is not None

        async def one():
            stream = await client.start("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4,
                                                                       ignore_eos=True))
            await stream.collect()
            return stream.num_tokens

        assert asyncio.run(one()) == 4
    finally:
        client.shutdown()
    with pytest.raises(ModelLoadError, match="not found"):
        EngineClient(build=lambda: load_checkpoint("/nonexistent/model"), log_interval=0)
    with pytest.raises(ValueError):
        EngineClient()
