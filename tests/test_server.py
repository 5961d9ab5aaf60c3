"""The HTTP server end to end: a live uvicorn on 127.0.0.1 driven by the openai SDK and httpx."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from mtp_helpers import save_random_head
from prometheus_client.parser import text_string_to_metric_families

from mtpserve.engine.async_engine import EngineClient
from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.server.app import build_app

openai = pytest.importorskip("openai")
MODEL = "tiny"
GREEDY = {"temperature": 0, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(tiny_llama_dir, tmp_path_factory):
    checkpoint = load_checkpoint(tiny_llama_dir)
    head = save_random_head(tmp_path_factory.mktemp("head"), checkpoint.config)
    engine = LLMEngine(checkpoint, EngineConfig(num_blocks=128, block_size=16, spec_adaptive=False, mtp_head=head))
    c = EngineClient(engine)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def base_url(client):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(client, MODEL), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


@pytest.fixture(scope="module")
def sdk(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def sse_events(response) -> list:
    raw = response.text if hasattr(response, "text") else response
    assert raw.endswith("data: [DONE]\n\n")
    blocks = raw.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks)
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks]


def scrape(http) -> dict:
    samples = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            samples[key] = s.value
    return samples


def test_chat_stream_equals_non_stream(sdk):
    kwargs = dict(model=MODEL, messages=chat("Hello there"), max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    resp = sdk.chat.completions.create(**kwargs)
    text = resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 12
    metrics = resp.to_dict()["metrics"]
    assert metrics["speculative"]["num_draft_tokens"] > 0
    assert metrics["speculative"]["num_accepted_tokens"] + metrics["speculative"]["num_steps"] == 12
    assert metrics["timings"]["ttft_ms"] > 0
    chunks = list(sdk.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "metrics" in chunks[-1].to_dict()
    off = sdk.chat.completions.create(**{**kwargs, "extra_body": {"ignore_eos": True,
                                                                  "speculative": {"enabled": False}}})
    assert off.choices[0].message.content == text
    assert off.to_dict()["metrics"]["speculative"]["num_draft_tokens"] == 0
    one = sdk.chat.completions.create(**{**kwargs, "extra_body": {"ignore_eos": True, "speculative": {"n_max": 1}}})
    assert one.choices[0].message.content == text
    assert len(one.to_dict()["metrics"]["speculative"]["accepted_per_position"]) <= 1


def test_completions_models_and_text_parts(sdk, http):
    resp = sdk.completions.create(model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 8 and resp.choices[0].finish_reason == "length"
    assert [m.id for m in sdk.models.list().data] == [MODEL]
    two = sdk.completions.create(model=MODEL, prompt=["a b", "c d"], max_tokens=4, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert len(two.choices) == 2 and two.usage.completion_tokens == 8
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    joined = http.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 6, **GREEDY}).json()
    plain = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello there"}],
                                                    "max_tokens": 6, **GREEDY}).json()
    assert joined["choices"][0]["message"] == plain["choices"][0]["message"]


def test_n_and_seed(sdk):
    kwargs = dict(model=MODEL, messages=chat("Tell me"), max_tokens=10, temperature=1.0,
                  extra_body={"ignore_eos": True})
    both = sdk.chat.completions.create(n=2, seed=7, **kwargs)
    assert len(both.choices) == 2 and both.usage.completion_tokens == 20
    assert [c.index for c in both.choices] == [0, 1]
    first = sdk.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    second = sdk.chat.completions.create(seed=8, **kwargs).choices[0].message.content
    assert [c.message.content for c in both.choices] == [first, second]
    assert sdk.chat.completions.create(seed=7, **kwargs).choices[0].message.content == first


def test_stop_strings(sdk, http):
    kwargs = dict(model=MODEL, prompt="Hello world", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = sdk.completions.create(**kwargs).choices[0].text
    stop = text[6:9]
    assert len(stop) == 3
    expected = text[:text.find(stop)]
    resp = sdk.completions.create(stop=[stop, "\x00never"], **kwargs)
    assert resp.choices[0].text == expected and resp.choices[0].finish_reason == "stop"
    streamed = list(sdk.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_sse_framing_and_usage(http):
    body = {"model": MODEL, "messages": chat("Hi"), "max_tokens": 9, "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events[:-1])
    last = events[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 9
    assert set(last["metrics"]) == {"speculative", "timings"}
    assert events[-3]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body, status, param, code", [
    ({"messages": chat("x"), "bogus": 1}, 400, "bogus", "unsupported_field"),
    ({"messages": chat("x"), "functions": [{"name": "f"}]}, 400, "functions", "unsupported_field"),
    ({"messages": chat("x"), "tools": [{"type": "function"}]}, 400, "tools.0.function", None),
    ({"messages": chat("x"), "logit_bias": {"1": 2}}, 400, "logit_bias", "unsupported_field"),
    ({"messages": chat("x"), "top_logprobs": 2}, 400, "top_logprobs", None),
    ({"messages": chat("x"), "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages", None),
    ({"messages": chat("x"), "temperature": -1}, 400, "temperature", None),
    ({"messages": []}, 400, "messages", None),
    ({"messages": chat("x"), "model": "other"}, 404, "model", "model_not_found"),
    ({"messages": chat("hello " * 300)}, 400, "messages", "context_length_exceeded"),
])
def test_error_envelope(http, body, status, param, code):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if code:
        assert err["code"] == code


def test_other_errors_and_endpoints(http):
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    ids = http.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"
    assert http.post("/tokenize", json={"messages": chat("Hi")}).json()["count"] > len(ids)


def test_auth_and_queue_limit(client):
    async def go():
        keyed = httpx.AsyncClient(transport=httpx.ASGITransport(build_app(client, MODEL, api_key="s3cret")),
                                  base_url="http://t")
        full = httpx.AsyncClient(transport=httpx.ASGITransport(build_app(client, MODEL, max_queue=0)),
                                 base_url="http://t")
        async with keyed, full:
            assert (await keyed.get("/health")).status_code == 200
            r = await keyed.get("/v1/models")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert (await keyed.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
            assert (await keyed.get("/v1/models", headers={"Authorization": "Bearer s3cret"})).status_code == 200
            r = await full.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"

    asyncio.run(go())


def test_metrics_count_tokens(http):
    names = ["mtpserve_requests_running", "mtpserve_requests_waiting", "mtpserve_kv_cache_usage_ratio",
             "mtpserve_prompt_tokens_total", "mtpserve_generation_tokens_total", "mtpserve_preemptions_total",
             "mtpserve_spec_drafts_total", "mtpserve_spec_draft_tokens_total", "mtpserve_spec_accepted_tokens_total",
             "mtpserve_time_to_first_token_seconds_count", "mtpserve_inter_token_latency_seconds_count",
             "mtpserve_e2e_request_latency_seconds_count", "mtpserve_request_queue_time_seconds_count",
             "mtpserve_request_prefill_time_seconds_count", "mtpserve_request_acceptance_rate_count",
             "mtpserve_request_acceptance_length_count", "mtpserve_request_decode_tokens_per_second_count"]
    before = scrape(http)
    assert all(n in before for n in names), [n for n in names if n not in before]
    assert "mtpserve_request_success_total,finished_reason=length" in before
    results = []
    for i, stream in enumerate([False, True, False]):
        body = {"model": MODEL, "prompt": f"count {i}", "max_tokens": 5 + i, "stream": stream,
                "stream_options": {"include_usage": True} if stream else None, **GREEDY}
        r = http.post("/v1/completions", json={k: v for k, v in body.items() if v is not None})
        results.append(r.json()["usage"] if not stream else sse_events(r)[-2]["usage"])
    after = scrape(http)

    def delta(name):
        return after[name] - before.get(name, 0)

    assert delta("mtpserve_generation_tokens_total") == sum(u["completion_tokens"] for u in results) == 18
    assert delta("mtpserve_prompt_tokens_total") == sum(u["prompt_tokens"] for u in results)
    assert delta("mtpserve_request_success_total,finished_reason=length") == 3
    assert delta("mtpserve_e2e_request_latency_seconds_count") == 3
    assert delta("mtpserve_spec_draft_tokens_total") > 0
    assert delta("mtpserve_spec_accepted_tokens_total") == sum(
        after[k] - before.get(k, 0) for k in after if k.startswith("mtpserve_spec_accepted_tokens_per_position_total"))


def test_stream_with_n_matches_non_stream(http):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 7, "n": 2, **GREEDY}
    plain = http.post("/v1/completions", json=body).json()
    events = sse_events(http.post("/v1/completions", json={**body, "stream": True}))[:-1]
    texts = ["", ""]
    for e in events:
        (choice,) = e["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in plain["choices"]] and texts[0] == texts[1]
    assert sorted(e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]) == [0, 1]


def test_chat_logprobs(sdk):
    kwargs = {"model": MODEL, "messages": chat("Hi"), "max_tokens": 8, "temperature": 0, "logprobs": True,
              "top_logprobs": 3, "extra_body": {"ignore_eos": True}}
    content = sdk.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert len(content) == 8
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].token == item.token and abs(item.top_logprobs[0].logprob - item.logprob) < 1e-4
        assert item.bytes == list(item.token.encode()) and item.top_logprobs[0].logprob >= item.top_logprobs[2].logprob
    streamed = [x for c in sdk.chat.completions.create(stream=True, **kwargs) if c.choices and c.choices[0].logprobs
                for x in c.choices[0].logprobs.content]
    assert [(x.token, round(x.logprob, 4)) for x in streamed] == [(x.token, round(x.logprob, 4)) for x in content]
    plain = sdk.chat.completions.create(**{**kwargs, "top_logprobs": None})
    assert all(x.top_logprobs == [] for x in plain.choices[0].logprobs.content)
    assert sdk.chat.completions.create(**{**kwargs, "logprobs": None, "top_logprobs": None}).choices[0].logprobs is None


def test_completion_logprobs(http):
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 6, "logprobs": 2, **GREEDY}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-4)
               for top, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    events = sse_events(http.post("/v1/completions", json={**body, "stream": True}))[:-1]
    parts = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert [t for p in parts for t in p["tokens"]] == lp["tokens"]
    assert [t for p in parts for t in p["text_offset"]] == lp["text_offset"]
    assert http.post("/v1/completions", json={**body, "logprobs": 6}).status_code == 400
