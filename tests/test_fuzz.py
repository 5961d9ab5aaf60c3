"""Hostile input: schemathesis against our OpenAPI document, hypothesis over the request models, and explicit
cases. No answer may be a 5xx and every error must be the OpenAI envelope.

``FUZZ_EXAMPLES`` sets the examples per operation (default 15; a long run: 500 or more)."""

from __future__ import annotations

import collections
import json
import math
import os
import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mtp_helpers import save_random_head
from pydantic import ValidationError
from starlette.testclient import TestClient

from mtpserve.engine.async_engine import EngineClient
from mtpserve.engine.config import EngineConfig, GenerationDefaults
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.errors import RequestError
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.noise import RequestNoise, keys
from mtpserve.server.app import build_app
from mtpserve.server.protocol import ChatCompletionRequest, CompletionRequest
from mtpserve.server.routes import sampling_params

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))
MAX_MODEL_LEN = 64
ENVELOPE = {"message", "type", "param", "code"}
STATUSES: collections.Counter = collections.Counter()  # of the generated requests, printed at the end (-s)


@pytest.fixture(scope="module", autouse=True)
def print_statuses():
    yield
    print(f"\nfuzz: {sum(STATUSES.values())} generated requests, statuses {dict(sorted(STATUSES.items()))}")


def assert_envelope(r, count: bool = False) -> None:
    STATUSES.update([r.status_code] if count else [])
    assert r.status_code < 500, r.text[:300]
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == ENVELOPE and isinstance(err["message"], str) and err["message"], r.text[:300]


@pytest.fixture(scope="module")
def client(tiny_llama_dir, tmp_path_factory):
    checkpoint = load_checkpoint(tiny_llama_dir)
    head = save_random_head(tmp_path_factory.mktemp("head"), checkpoint.config)
    config = EngineConfig(num_blocks=16, block_size=16, max_model_len=MAX_MODEL_LEN, spec_adaptive=False,
                          mtp_head=head)
    c = EngineClient(LLMEngine(checkpoint, config), log_interval=0)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def app(client):
    return build_app(client, "tiny")


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


# positive_data_acceptance is left out: the server refuses some schema-valid bodies by design (a prompt longer than
# the context, a declared-but-unsupported field such as "tools"), always with a 400 in the envelope.
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_schema_fuzz(case):
    response = case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])
    assert_envelope(response, count=True)


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
ODD = (st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True, allow_infinity=True)
       | st.booleans() | st.none() | st.text(max_size=10) | st.lists(JSON_SCALARS, max_size=3))
FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "stop", "ignore_eos", "logprobs", "speculative")


@settings(max_examples=max(EXAMPLES * 10, 100), deadline=None, database=None)
@given(st.dictionaries(st.sampled_from(FIELDS), ODD, max_size=6), st.booleans())
def test_request_models_reach_the_engine_only_valid(fields, chat):
    """Whatever the request models accept becomes sampling parameters the engine either takes or refuses with a
    RequestError (a 400), never another exception."""
    body = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    try:
        req = (ChatCompletionRequest if chat else CompletionRequest).model_validate({**body, **fields})
    except ValidationError:
        return
    for j in range(req.n):
        params = sampling_params(req, GenerationDefaults(), req.max_tokens or 16, j)
        try:
            params.validate()
        except RequestError:
            return
        keys(RequestNoise.of(params.seed).seed, 0, 0)
        assert math.isfinite(params.temperature) and params.max_tokens >= 1


@settings(max_examples=EXAMPLES * 2, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]),
       body=st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.sampled_from(FIELDS + ("prompt", "messages", "tokens", "role",
                                                                     "content")), inner, max_size=4), max_leaves=12))
def test_arbitrary_json_bodies(http, path, body):
    content = json.dumps(body).encode()  # NaN and Infinity included: Python's parser takes them
    assert_envelope(http.post(path, content=content, headers={"content-type": "application/json"}), count=True)


NESTED = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
SHALLOW_NESTED = b'{"prompt": "x", "stop": ' + b"[" * 500 + b"]" * 500 + b"}"


@pytest.mark.parametrize("content, headers, status", [
    (b'{"prompt": "\xff\xfe", "max_tokens": 2}', {}, 400),                       # invalid UTF-8
    (b'{"prompt": "a\\u0000b", "max_tokens": 2}', {}, 200),                       # NUL in text
    (b'{"prompt": "\\ud800x", "max_tokens": 2}', {}, 400),                        # lone surrogate
    (b'{"prompt": "a", "max_tokens": 1' + b"0" * 400 + b"}", {}, 200),             # huge: capped by the context
    (b'{"prompt": "a", "max_tokens": 2, "temperature": 1e400}', {}, 400),         # parses as inf
    (b'{"prompt": "a", "max_tokens": 2, "seed": 100000000000000000000000}', {}, 400),
    (b'{"prompt": "a", "max_tokens": 2, "top_k": 1000000000000}', {}, 200),
    (b'{"prompt": "a", "max_tokens": 0}', {}, 400),
    (b'{"prompt": "a", "max_tokens": -5}', {}, 400),
    (b'{"prompt": "a", "max_tokens": 2, "n": 17}', {}, 400),
    (b'{"prompt": [70000], "max_tokens": 2}', {}, 400),                           # token id out of the vocabulary
    (b'{"prompt": [true], "max_tokens": 2}', {}, 400),                            # not an integer
    (NESTED, {}, 400),
    (SHALLOW_NESTED, {}, 400),
    (b'{"prompt": "a"}', {"content-type": "text/plain"}, 400),
    (b"prompt=a", {"content-type": "application/x-www-form-urlencoded"}, 400),
    (b"", {}, 400),
])
def test_explicit_bad_bodies(http, content, headers, status):
    r = http.post("/v1/completions", content=content, headers={"content-type": "application/json", **headers})
    assert r.status_code == status, r.text[:300]
    assert_envelope(r)


def test_big_body_methods_and_paths(http):
    r = http.post("/v1/chat/completions", content=b'{"messages": "' + b"x" * (10 << 20) + b'"}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert_envelope(http.get("/nothing/here"))
    assert http.post("/v1/completions", json={"prompt": "a"}, headers={"content-type": "text/plain"}).json()[
        "error"]["message"].startswith("the request body must be JSON")


def test_long_stop_list(http):
    base = {"prompt": "The quick brown", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    text = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    assert len(text) > 8
    stop = text[5:8]
    r = http.post("/v1/completions", json={**base, "stop": [f"never-{i}" for i in range(499)] + [stop]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == text[:text.find(stop)]


def test_prompt_at_and_past_the_context_limit(http):
    ids = http.post("/tokenize", json={"prompt": "word " * 100}).json()["tokens"]
    fits = http.post("/v1/completions", json={"prompt": ids[:MAX_MODEL_LEN - 1], "max_tokens": 4})
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 1
    for n in (MAX_MODEL_LEN, MAX_MODEL_LEN + 1):
        r = http.post("/v1/completions", json={"prompt": ids[:n], "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 100}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"


RAISING = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
           "{% for m in messages %}{{ m['content'] }}{% endfor %}")
BROKEN = "{{ messages[0]['content'].no_such_method() }}"


@pytest.mark.parametrize("template, message", [(RAISING, "System role not supported"),
                                               (BROKEN, "chat template failed")])
def test_chat_template_that_raises(tiny_llama_dir, tmp_path, template, message):
    path = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, path)
    config_path = path / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**tok_config, "chat_template": template}))
    client = EngineClient(LLMEngine(load_checkpoint(str(path)), EngineConfig(num_blocks=8, block_size=16)),
                          log_interval=0)
    try:
        with TestClient(build_app(client, "tiny"), raise_server_exceptions=False) as http:
            for route in ("/v1/chat/completions", "/tokenize"):
                r = http.post(route, json={"messages": [{"role": "system", "content": "s"},
                                                        {"role": "user", "content": "u"}]})
                assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
                assert r.json()["error"]["param"] == "messages"
            ok = http.post("/v1/completions", json={"prompt": "still serving", "max_tokens": 2})
            assert ok.status_code == 200
    finally:
        client.shutdown()


def test_fuzzed_server_still_serves(http):
    assert http.get("/health").status_code == 200
    assert http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200
