"""The server under load and over its life: body size limit, concurrent streams, dropped clients, SIGTERM,
--config, and the periodic progress log."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time

import httpx
import pytest
import yaml
from server_helpers import start_server, wait_healthy
from test_server import GREEDY, MODEL, base_url, client, free_port, http, scrape  # noqa: F401 (fixtures)

from mtpserve.engine.busy_log import BusyLog
from mtpserve.engine.engine import RequestOutput
from mtpserve.engine.spec.stats import SpecStats
from mtpserve.server.app import build_app


def test_body_limit_413(client, http):  # noqa: F811
    big = http.post("/v1/completions", json={"prompt": "x" * (1 << 20), "max_tokens": 1})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    # over a real socket, a body far over the limit: the answer arrives, not a reset while still sending
    huge = http.post("/v1/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    address = (http.base_url.host, http.base_url.port)
    head = "POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
    status, answer = paced_upload(address, head, 5 << 20)
    assert status == 413 and json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    status, _ = paced_upload(address, head + "X-Big: " + "h" * (20 << 10) + "\r\n", 900 << 10)
    assert status == 431
    status, answer = paced_upload(address, "POST /v1/nothing-here HTTP/1.1\r\n", 900 << 10)  # no route: 404
    assert status == 404 and b"not found" in answer
    assert http.get("/health").status_code == 200


def paced_upload(address, head: str, size: int) -> tuple[int, bytes]:
    """Send a request whose body of ``size`` bytes goes out in 64 KiB pieces, 1 ms apart (as a client on a
    slower link would), then read the answer: (status, raw answer)."""
    with socket.create_connection(address, timeout=30) as s:
        s.sendall(f"{head}Host: test\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n".encode())
        for start in range(0, size, 1 << 16):
            s.sendall(b"x" * min(1 << 16, size - start))
            time.sleep(0.001)
        answer = b""
        while chunk := s.recv(65536):  # until the server closes, as asked
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer

    async def go():
        small = httpx.AsyncClient(transport=httpx.ASGITransport(build_app(client, MODEL, max_body_bytes=100)),
                                  base_url="http://t")
        async with small:
            r = await small.post("/v1/completions", json={"prompt": "y" * 200})
            assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}

            async def chunks():  # no Content-Length: caught while the body is read
                for _ in range(5):
                    yield b'"' + b"z" * 40 + b'",'

            r = await small.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
            ok = await small.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
            assert ok.status_code == 200

    asyncio.run(go())


def test_concurrent_streams_match_sequential(base_url, http):  # noqa: F811
    bodies = [{"model": MODEL, "prompt": f"Story {i}: the", "max_tokens": 10 + i % 5, **GREEDY} for i in range(16)]
    expected = [http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]

    async def one(c, body):
        text, done = "", False
        async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    text += json.loads(line[6:])["choices"][0]["text"]
        assert done
        return text

    async def go():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
            return await asyncio.gather(*(one(c, b) for b in bodies))

    assert asyncio.run(go()) == expected


def test_dropped_streams_are_aborted(base_url, http):  # noqa: F811
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "stream": True, **GREEDY}
    clients = [httpx.Client(base_url=base_url, timeout=30) for _ in range(20)]
    try:
        for c in clients:
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                next(r.iter_raw())
    finally:
        for c in clients:
            c.close()
    deadline = time.time() + 15
    while time.time() < deadline:
        m = scrape(http)
        if m["mtpserve_requests_running"] == 0 and m["mtpserve_kv_cache_usage_ratio"] == 0:
            break
        time.sleep(0.05)
    assert m["mtpserve_requests_running"] == 0 and m["mtpserve_requests_waiting"] == 0
    assert m["mtpserve_kv_cache_usage_ratio"] == 0
    assert m["mtpserve_request_success_total,finished_reason=abort"] >= 20


def test_serve_command_options():
    from mtpserve.cli.main import build_parser
    from mtpserve.cli.serve import served_name

    args = build_parser().parse_args(["serve", "--model", "/models/my-model/", "--max-queue", "4"])
    assert (args.host, args.port, args.api_key, args.max_queue) == ("127.0.0.1", 8000, None, 4)
    assert (args.max_body_bytes, args.log_interval) == (1 << 20, 5.0)
    assert served_name(args) == "my-model"
    assert served_name(build_parser().parse_args(["serve", "--served-model-name", "x"])) == "x"


def test_busy_log_line(caplog):
    log = BusyLog(interval=0.01)
    stats = SpecStats()
    stats.observe(3, 2)
    stats.observe(3, 0)
    log.observe([RequestOutput("r1", (1, 2, 3, 4), (), None, stats.copy(), {})])
    time.sleep(0.02)
    with caplog.at_level(logging.INFO, logger="mtpserve.engine.busy_log"):
        assert log.maybe_log(running=1, waiting=2)
    line = caplog.records[-1].getMessage()
    assert "running 1, waiting 2" in line and "tok/s" in line
    assert "mean acceptance length 2.00" in line and "[0.50, 0.50, 0.00]" in line
    stats.observe(2, 2)  # only the new step counts in the next window
    log.observe([RequestOutput("r1", (5, 6, 7), (), "length", stats.copy(), {})])
    assert "mean acceptance length 3.00" in log.line(0, 0, 1.0) and "3.0 tok/s" in log.line(0, 0, 1.0)
    time.sleep(0.02)
    assert log.maybe_log(running=0, waiting=0)  # tokens since the last line
    time.sleep(0.02)
    assert not log.maybe_log(running=0, waiting=0)  # idle: no line


@pytest.mark.parametrize("grace", [5.0, 0.2])  # the stream finishes within the grace period / is cut off
def test_sigterm_mid_stream_exits_zero(tiny_llama_dir, tmp_path, grace):
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"model": tiny_llama_dir, "port": port, "device": "cpu", "num_blocks": 64,
                                      "served-model-name": MODEL, "shutdown_grace": grace, "log_interval": 0.05}))
    log_path = tmp_path / "server.log"
    proc = start_server(config, log_path, "--log-level", "info")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        body = {"model": MODEL, "prompt": "secret zebra words", "max_tokens": 400, "stream": True, **GREEDY}
        lines = []
        with httpx.Client(base_url=url, timeout=20) as c, c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            it = r.iter_lines()
            lines.append(next(it))
            time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            start = time.time()
            try:
                lines.extend(it)
                assert [x for x in lines if x][-1] == "data: [DONE]"  # finished within the grace period
            except (httpx.RemoteProtocolError, httpx.ReadError):
                pass  # or the connection was closed: also fine, the client does not hang
            assert time.time() - start < 10
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert "mtpserve: serving 'tiny'" in log and "tok/s" in log and "mean acceptance length" in log
    assert "zebra" not in log


def test_seeded_requests_repeat_exactly_whatever_the_drafting(tiny_qwen3_dir, tmp_path):
    """One server, adaptive drafting on: a seeded request (n=2) sent again gives the same texts when the step-cost
    fit is perturbed to draft as much or as little as it can, and under random draft plans."""
    import random

    from mtp_helpers import save_distilled_head
    from starlette.testclient import TestClient
    from test_mtp import prompts

    from mtpserve.engine.async_engine import EngineClient
    from mtpserve.engine.config import EngineConfig
    from mtpserve.engine.engine import LLMEngine
    from mtpserve.engine.loader import load_checkpoint

    head, _ = save_distilled_head(tmp_path / "head", tiny_qwen3_dir, prompts(24, seed=7), 200)
    engine = LLMEngine(load_checkpoint(tiny_qwen3_dir), EngineConfig(num_blocks=64, block_size=16, mtp_head=head))
    assert engine.config.spec_adaptive and engine.mtp is not None
    client = EngineClient(engine, log_interval=0)
    body = {"model": MODEL, "prompt": prompts(24, seed=7)[0], "temperature": 0.8, "top_p": 0.95, "seed": 7, "n": 2,
            "max_tokens": 32, "ignore_eos": True}
    rng = random.Random(0)
    perturbations = [
        lambda: None,
        lambda: setattr(engine.policy.fit, "scale", lambda batch_size: 0.05),
        lambda: setattr(engine.policy.fit, "scale", lambda batch_size: 50.0),
        lambda: setattr(engine.policy, "plan",
                        lambda requests, batch_size, fused=False: [rng.randint(0, 3) for _ in requests]),
    ]
    texts, drafted = [], []
    try:
        with TestClient(build_app(client, MODEL)) as http:
            for perturb in perturbations:
                perturb()
                out = http.post("/v1/completions", json=body).json()
                texts.append([c["text"] for c in out["choices"]])
                drafted.append(sum(c["metrics"]["speculative"]["num_draft_tokens"] for c in out["choices"]))
    finally:
        client.shutdown()
    assert all(t == texts[0] for t in texts), texts
    assert texts[0][0] != texts[0][1]  # the two choices are different samples
    assert drafted[3] > 0 and len(set(drafted)) > 1  # the runs really drafted differently
