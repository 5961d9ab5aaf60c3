"""Security: the API key guards every route but /health (and /metrics only when made public), compared in constant
time; no request content in the logs unless --log-prompts; header size limit; per-client concurrency limit; the
server binds loopback by default and warns when it listens everywhere without a key."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from mtpserve.cli.main import build_parser
from mtpserve.cli.serve import warn_if_exposed
from mtpserve.engine.async_engine import EngineClient
from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.server import auth
from mtpserve.server.app import build_app
from mtpserve.server.background import serve_in_background

KEY = "s3cret-key"
SECRET = "zebra-pineapple-quartz"  # request content that must not reach the logs


@pytest.fixture(scope="module")
def client(tiny_llama_dir):
    c = EngineClient(LLMEngine(load_checkpoint(tiny_llama_dir), EngineConfig(num_blocks=32, block_size=16)),
                     log_interval=0)
    yield c
    c.shutdown()


def asgi(app, host: str = "127.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app, client=(host, 50000)), base_url="http://t",
                             timeout=30)


def routes(app) -> list[tuple[str, str]]:
    pairs = []
    for r in app.routes:
        for method in getattr(r, "methods", ()) or ():
            if method != "HEAD":
                pairs.append((method, r.path))
    return sorted(pairs)


@pytest.mark.parametrize("metrics_public", [False, True])
def test_api_key_on_every_route_but_health(client, metrics_public):
    app = build_app(client, "tiny", api_key=KEY, metrics_public=metrics_public)
    public = {"/health"} | ({"/metrics"} if metrics_public else set())
    bodies = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
              "/v1/completions": {"prompt": "hi", "max_tokens": 1}, "/tokenize": {"prompt": "hi"},
              "/detokenize": {"tokens": [5]}}
    wrong = [{}, {"authorization": f"Bearer {KEY}x"}, {"authorization": "Bearer s"}, {"authorization": KEY},
             {"authorization": f"bearer {KEY}"}, {"x-api-key": KEY}]

    async def go():
        async with asgi(app) as c:
            found = routes(app)
            assert {p for _, p in found} >= {"/v1/models", "/metrics", "/openapi.json", "/docs", *bodies}
            for method, path in found + [("GET", "/no/such/route")]:
                for headers in wrong:
                    r = await c.request(method, path, json=bodies.get(path), headers=headers)
                    if path in public:
                        assert r.status_code == 200, (path, r.text)
                    else:
                        assert r.status_code == 401, (method, path, headers)
                        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"]
                r = await c.request(method, path, json=bodies.get(path), headers={"authorization": f"Bearer {KEY}"})
                assert r.status_code == (404 if path == "/no/such/route" else 200), (path, r.text)

    asyncio.run(go())


def test_key_compared_in_constant_time(client, monkeypatch):
    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    app = build_app(client, "tiny", api_key=KEY)

    async def go():
        async with asgi(app) as c:
            for given in ("", "Bearer x", f"Bearer {KEY}", "Bearer " + "k" * 500):
                await c.get("/v1/models", headers={"authorization": given})

    asyncio.run(go())
    assert len(calls) == 4 and set(calls) == {(32, 32)}  # fixed-length digests: the key's length does not show


def generate_everything(app) -> None:
    """Requests whose content must stay out of the logs: completions, chat, a stream, errors of several kinds."""
    async def go():
        async with asgi(app) as c:
            await c.post("/v1/completions", json={"prompt": SECRET, "max_tokens": 2})
            await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": SECRET}],
                                                       "max_tokens": 2, "stream": True})
            await c.post("/v1/completions", json={"prompt": SECRET, "max_tokens": 0})
            await c.post("/v1/completions", json={"prompt": SECRET, "bogus": SECRET})
            await c.post("/v1/completions", json={"prompt": SECRET * 100, "max_tokens": 2})
            await c.post("/tokenize", json={"prompt": SECRET})

    asyncio.run(go())


def test_no_request_content_in_logs_unless_asked(client, caplog, monkeypatch):
    execute = client.engine.runner.execute

    def failing(out):  # a failing model step logs its traceback: still no content
        if any(SECRET in client.tokenizer.decode(s.request.prompt_token_ids) for s in out.scheduled):
            raise RuntimeError("injected model-step fault")
        return execute(out)

    monkeypatch.setattr(client.engine.runner, "execute", failing)
    with caplog.at_level(logging.DEBUG):
        generate_everything(build_app(client, "tiny"))
    assert "model step failed" in caplog.text and SECRET not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtpserve.server.prompts"):
        generate_everything(build_app(client, "tiny", log_prompts=True))
    logged = [r.getMessage() for r in caplog.records if r.name == "mtpserve.server.prompts"]
    assert len(logged) == 3 and all(SECRET in m for m in logged)  # the three requests past validation


def test_header_size_limit(client):
    app = build_app(client, "tiny", max_header_bytes=2000)

    async def go():
        async with asgi(app) as c:
            ok = await c.get("/v1/models", headers={"x-pad": "a" * 1000})
            big = await c.get("/v1/models", headers={"x-pad": "a" * 3000})
            return ok, big

    ok, big = asyncio.run(go())
    assert ok.status_code == 200
    assert big.status_code == 431 and big.json()["error"]["code"] == "headers_too_large"


def test_per_client_concurrency_limit(client):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    one = {**body, "max_tokens": 1, "stream": False}
    # a live server: a client is its address, or the X-Forwarded-For a local proxy sets (uvicorn trusts loopback)
    with serve_in_background(build_app(client, "tiny", max_concurrent_per_client=2)) as url, \
            httpx.Client(base_url=url, timeout=30) as mine:
        with mine.stream("POST", "/v1/completions", json=body) as a, \
                mine.stream("POST", "/v1/completions", json=body) as b:
            assert a.status_code == b.status_code == 200
            third = mine.post("/v1/completions", json=one)
            elsewhere = mine.post("/v1/completions", json=one, headers={"x-forwarded-for": "10.0.0.9"})
            cheap = mine.get("/v1/models")
        for _ in range(100):  # until the server has noticed the two closed streams
            after = mine.post("/v1/completions", json=one)
            if after.status_code != 429:
                break
            time.sleep(0.05)
    assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_concurrent_requests"
    assert elsewhere.status_code == 200 and cheap.status_code == 200 and after.status_code == 200


def test_loopback_by_default_and_warning_when_exposed(caplog):
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    with caplog.at_level(logging.WARNING, logger="mtpserve.cli.serve"):
        assert warn_if_exposed("0.0.0.0", None) and warn_if_exposed("::", None)
        assert not warn_if_exposed("0.0.0.0", KEY) and not warn_if_exposed("127.0.0.1", None)
    assert len(caplog.records) == 2 and "without --api-key" in caplog.records[0].getMessage()
