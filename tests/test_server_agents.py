"""What agents and SDKs send, end to end with the openai SDK on a live server: no-op fields, tool
calls (streamed and not, forced), a tool round trip, the reasoning split, stop and usage options,
and the HTTP plumbing (X-Request-Id, CORS, keep-alive, the request counter).

Where the test needs the model to write a given answer (a tool call, a thinking block), verification
is replaced by a script: each step emits the script's next token, then EOS."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from conftest import EOS_ID, make_tiny_checkpoint
from mtp_helpers import save_random_head

from mtpserve.engine.async_engine import EngineClient
from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.server.app import build_app
from mtpserve.server.background import serve_in_background
from mtpserve.server.chat_prompt import ServerChatSettings

openai = pytest.importorskip("openai")
MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# a template of our own that renders tools, tool calls and results, names and thinking
TOOLS_TEMPLATE = """\
{% if tools %}<|im_start|>system
Tools:
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{% for m in messages %}
{% if m.role == 'assistant' %}<|im_start|>assistant
{% if m.reasoning_content %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}{% if m.name %} name={{ m.name }}{% endif %}

{{ m.content }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # a context long enough for tool descriptions in the tiny tokenizer's many tokens
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_long"), "llama", max_position_embeddings=2048)
    checkpoint = load_checkpoint(path)
    head = save_random_head(tmp_path_factory.mktemp("head"), checkpoint.config)
    engine = LLMEngine(checkpoint, EngineConfig(num_blocks=128, block_size=16, spec_adaptive=False,
                                                mtp_head=head))
    c = EngineClient(engine)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def plain_url(client):
    """The model's own template (no tools in it: the Hermes fallback)."""
    with serve_in_background(build_app(client, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def tools_url(client):
    settings = ServerChatSettings(chat_template=TOOLS_TEMPLATE)
    with serve_in_background(build_app(client, MODEL, chat_settings=settings)) as url:
        yield url


def sdk(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def script(client, monkeypatch):
    """``script(text)``: from then on every request answers ``text`` token by token, then EOS."""
    def set_text(text: str) -> None:
        ids = client.tokenizer.encode(text, add_special_tokens=False)

        def scripted(logits, batch):
            answers = []
            for outputs in batch.output_token_ids:
                n = len(outputs)
                answers.append([ids[n] if n < len(ids) else EOS_ID])
            return answers

        monkeypatch.setattr("mtpserve.engine.runner.verify", scripted)
    return set_text


def prompt_text(url: str, body: dict) -> str:
    ids = httpx.post(url + "/tokenize", json=body, timeout=30).json()["tokens"]
    return httpx.post(url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]


def test_no_op_fields_are_accepted(plain_url):
    c = sdk(plain_url)
    messages = [{"role": "user", "content": "Hi", "name": "alice"}]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, store=True,
                                  metadata={"team": "a"}, service_tier="auto", prompt_cache_key="k1",
                                  safety_identifier="u-1", user="u", tools=[], tool_choice="none",
                                  logit_bias={})
    assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=2, suffix="", logit_bias={},
                             extra_body={"store": False, "metadata": {}})
    assert r.choices[0].text is not None


@pytest.mark.parametrize("extra, param", [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"bogus": 1}, "bogus"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
])
def test_unsupported_fields_share_one_code(plain_url, extra, param):
    c = sdk(plain_url)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                  max_tokens=2, extra_body=extra)
    error = info.value.body
    assert error["code"] == "unsupported_field" and error["param"] == param


def test_tool_call_streamed_and_not(plain_url, script):
    script('Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    c = sdk(plain_url)
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                max_tokens=200, temperature=0)
    r = c.chat.completions.create(**body)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    content, calls, finish = "", {}, None
    for chunk in c.chat.completions.create(**body, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": "", "id": d.id})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Checking." and finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_fallback_renders_tools_in_the_system_prompt(plain_url):
    text = prompt_text(plain_url, {"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER]})
    assert "<tools>" in text and '"name": "get_weather"' in text and "<tool_call>" in text
    assert text.index("<tools>") < text.index("Hi")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_choice_opens_the_call(plain_url, script, choice):
    # the prompt ends with the opening of the call; the model writes only the rest
    if choice == "required":
        script('{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    else:
        script('{"city": "Oslo"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')
    r = sdk(plain_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Oslo?"}], tools=[WEATHER], tool_choice=choice,
        max_tokens=200, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1  # a named choice: one call
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Oslo"}


def test_tool_choice_errors(plain_url):
    c = sdk(plain_url)
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        c.chat.completions.create(model=MODEL, messages=messages, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        c.chat.completions.create(model=MODEL, messages=[*messages, {"role": "tool", "content": "r"}])


def round_trip_messages() -> list[dict]:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    return [{"role": "user", "content": "Weather in Paris?", "name": "alice"},
            {"role": "assistant", "content": "", "tool_calls": [call], "reasoning_content": "look it up"},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"}]


def test_tool_round_trip_renders_and_continues(tools_url, script):
    messages = round_trip_messages()
    text = prompt_text(tools_url, {"messages": messages, "tools": [WEATHER]})
    assert 'Tools:\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18C and sunny\n</tool_response>" in text
    assert "user name=alice" in text and "<think>\nlook it up\n</think>" in text
    script("done</think>\n\nIt is 18C and sunny in Paris.")
    r = sdk(tools_url).chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=200)
    assert r.choices[0].message.content == "It is 18C and sunny in Paris." and r.choices[0].finish_reason == "stop"


def test_reasoning_split_streamed_and_not(tools_url, script):
    script("first I think\n</think>\n\nThe answer is 4.")
    c = sdk(tools_url)
    body = dict(model=MODEL, messages=[{"role": "user", "content": "2+2?"}], max_tokens=200)
    message = c.chat.completions.create(**body).choices[0].message
    assert message.content == "The answer is 4."
    assert message.model_extra["reasoning_content"] == "first I think\n"
    reasoning, content = "", ""
    for chunk in c.chat.completions.create(**body, stream=True):
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
    assert (reasoning, content) == ("first I think\n", "The answer is 4.")


def test_template_kwargs_and_server_default(client, tools_url, script):
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    assert prompt_text(tools_url, body).endswith("<think>\n")
    off = {**body, "chat_template_kwargs": {"enable_thinking": False}}
    assert prompt_text(tools_url, off).endswith("<think>\n\n</think>\n\n")
    script("Hello there.")
    message = sdk(tools_url).chat.completions.create(
        model=MODEL, max_tokens=100, messages=body["messages"],
        extra_body={"chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
    assert message.content == "Hello there." and message.model_extra["reasoning_content"] is None
    settings = ServerChatSettings(chat_template=TOOLS_TEMPLATE,
                                  default_template_kwargs={"enable_thinking": False})
    with serve_in_background(build_app(client, MODEL, chat_settings=settings)) as url:
        assert prompt_text(url, body).endswith("</think>\n\n")
        assert prompt_text(url, {**body, "chat_template_kwargs": {"enable_thinking": True}}).endswith("<think>\n")
    bad = httpx.post(tools_url + "/v1/chat/completions", json={**body, "chat_template_kwargs": {"messages": []}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"


def test_continuous_usage_stats(plain_url):
    stream = sdk(plain_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    counts = [chunk.usage.completion_tokens for chunk in chunks]
    assert all(chunk.usage is not None for chunk in chunks)
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 6
    assert len({chunk.usage.prompt_tokens for chunk in chunks}) == 1


def test_stop_token_ids_and_min_tokens(client, plain_url):
    c = sdk(plain_url)
    base = dict(model=MODEL, prompt="Hello", temperature=0)
    with client.lock:  # the greedy first token, from the engine itself
        prompt = client.tokenizer.encode("Hello")
        (first,) = client.engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    token = first.output_token_ids[0]
    stopped = c.completions.create(**base, max_tokens=8, extra_body={"stop_token_ids": [token]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == ""
    assert stopped.usage.completion_tokens == 1
    kept = c.completions.create(**base, max_tokens=8,
                                extra_body={"stop_token_ids": [token], "include_stop_str_in_output": True})
    assert kept.choices[0].text == client.tokenizer.decode([token])
    held = c.completions.create(**base, max_tokens=4, extra_body={"stop_token_ids": [token], "min_tokens": 4})
    assert held.choices[0].finish_reason == "length" and held.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        c.completions.create(**base, max_tokens=2, extra_body={"min_tokens": 3})


def test_stop_string_kept_on_request(plain_url, script):
    script("Hello world, stop here and more.")
    c = sdk(plain_url)
    base = dict(model=MODEL, prompt="Hi", max_tokens=100, stop=["here"])
    assert c.completions.create(**base).choices[0].text == "Hello world, stop "
    kept = c.completions.create(**base, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == "Hello world, stop here"


def test_request_id_and_http_counter(plain_url):
    with httpx.Client(base_url=plain_url, timeout=30) as http:
        r = http.get("/v1/models", headers={"X-Request-Id": "trace-42"})
        assert r.headers["x-request-id"] == "trace-42"
        assert len(http.get("/v1/models").headers["x-request-id"]) == 32  # a fresh one
        assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        http.get("/no/such/path")
        metrics = http.get("/metrics").text
    assert f'mtpserve_http_requests_total{{model_name="{MODEL}",route="/v1/models",status="200"}}' in metrics
    assert 'route="/v1/chat/completions",status="400"' in metrics
    assert 'route="other",status="404"' in metrics


def test_cors_only_when_allowed(client):
    async def preflight(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.options("/v1/chat/completions", headers={
                "Origin": "http://ui.test", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})

    allowed = asyncio.run(preflight(build_app(client, MODEL, api_key="k", allowed_origins=["http://ui.test"])))
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://ui.test"
    closed = asyncio.run(preflight(build_app(client, MODEL)))
    assert "access-control-allow-origin" not in closed.headers


def test_sse_keepalive_during_a_slow_prefill(client, monkeypatch):
    step = client.engine.step

    def slow_step():
        time.sleep(0.3)
        return step()

    monkeypatch.setattr(client.engine, "step", slow_step)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "stream": True}
    with serve_in_background(build_app(client, MODEL, sse_keepalive=0.05)) as url:
        raw = httpx.post(url + "/v1/completions", json=body, timeout=30).text
    assert ": keep-alive\n\n" in raw and raw.endswith("data: [DONE]\n\n")


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "color", "n", "tags"],
          "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}


def check_schema(value: dict) -> None:
    """SCHEMA checked by hand."""
    assert set(value) == {"ok", "color", "n", "tags"} and isinstance(value["ok"], bool)
    assert value["color"] in ("red", "green", "blue") and 0 <= value["n"] <= 99
    assert len(value["tags"]) <= 2 and set(value["tags"]) <= {"a", "b"}


def test_json_schema_output_parses_with_mtp_on_and_off(plain_url):
    c = sdk(plain_url)
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    texts = []
    for enabled in (True, False):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A thing"}], max_tokens=200,
                                      temperature=0, response_format=fmt,
                                      extra_body={"speculative": {"enabled": enabled}})
        assert r.choices[0].finish_reason == "stop"
        texts.append(r.choices[0].message.content)
        check_schema(json.loads(texts[-1]))
    assert texts[0] == texts[1]
    sampled = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Any"}], max_tokens=200,
                                        temperature=1.0, seed=3, response_format={"type": "json_object"})
    assert isinstance(json.loads(sampled.choices[0].message.content), dict)
