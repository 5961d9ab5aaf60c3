"""Structured output and forced tool calls with the openai SDK against a live server on the default model
(SmolLM2-135M-Instruct, its shipped MTP head): ``chat.completions.parse()`` with Pydantic models (nested objects,
enums, arrays, optional fields) always parses, and forced tool calls (``required``, named) return arguments that
follow the tool's schema, streamed and not. The checks of the values are written by hand from the schemas."""

from __future__ import annotations

import json
from enum import Enum
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from mtpserve.engine.async_engine import EngineClient
from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader.mtp_head import default_head_path
from mtpserve.server.app import build_app
from mtpserve.server.background import serve_in_background

openai = pytest.importorskip("openai")
MODEL = "smollm2"
MAX_TOKENS = 160


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)
    zip_code: str | None = Field(default=None, max_length=10)


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    favorite_color: Color
    address: Address


class Step(BaseModel):
    number: int = Field(ge=1, le=9)
    action: str = Field(max_length=40)


class Recipe(BaseModel):
    title: str = Field(max_length=32)
    difficulty: Literal["easy", "medium", "hard"]
    vegetarian: bool
    steps: list[Step] = Field(min_length=1, max_length=3)


class Review(BaseModel):
    rating: int = Field(ge=1, le=5)
    summary: str = Field(max_length=48)
    tags: list[Literal["price", "quality", "service"]] = Field(max_length=3)
    reply: str | None = Field(default=None, max_length=32)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
SEARCH = {"type": "function", "function": {
    "name": "search_web", "description": "Search the web",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["query"], "properties": {
        "query": {"type": "string", "maxLength": 40},
        "max_results": {"type": "integer", "minimum": 1, "maximum": 10}}}}}
TOOLS = [WEATHER, SEARCH]


def check_arguments(name: str, arguments: str) -> None:
    """The tool schemas above, checked by hand."""
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) <= {"city", "unit", "days"} and {"city", "unit"} <= set(args)
        assert isinstance(args["city"], str) and len(args["city"]) <= 24
        assert args["unit"] in ("celsius", "fahrenheit")
        assert "days" not in args or (type(args["days"]) is int and 1 <= args["days"] <= 7)
    else:
        assert name == "search_web" and set(args) <= {"query", "max_results"} and "query" in args
        assert isinstance(args["query"], str) and len(args["query"]) <= 40
        assert "max_results" not in args or (type(args["max_results"]) is int and 1 <= args["max_results"] <= 10)


@pytest.fixture(scope="module")
def sdk(smollm2_checkpoint):
    config = EngineConfig(kv_cache_memory_bytes=64 * 2**20, mtp_head=default_head_path(), spec_draft_n_max=3,
                          spec_adaptive=False)
    engine = LLMEngine(smollm2_checkpoint, config)
    client = EngineClient(engine)
    with serve_in_background(build_app(client, MODEL)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    client.shutdown()


@pytest.mark.parametrize(("model", "ask", "sampling"), [
    (Person, "Invent a person who lives in France.", {"temperature": 0}),
    (Recipe, "Give me a short pancake recipe.", {"temperature": 0}),
    (Review, "Review a coffee shop you liked.", {"temperature": 1.0, "seed": 11}),
])
def test_parse_with_pydantic_models(sdk, model, ask, sampling):
    r = sdk.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": ask}], response_format=model,
                                   max_tokens=MAX_TOKENS, **sampling)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, model)  # pydantic validated every constraint


def streamed_calls(sdk, **body) -> tuple[list[tuple[str, str]], str]:
    calls, finish = {}, None
    for chunk in sdk.chat.completions.create(**body, stream=True):
        choice = chunk.choices[0]
        for d in choice.delta.tool_calls or []:
            entry = calls.setdefault(d.index, ["", ""])
            entry[0] += d.function.name or ""
            entry[1] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize(("choice", "ask"), [("required", "What is the weather like in Lisbon this week?"),
                                             ("get_weather", "What is the weather like in Lisbon this week?"),
                                             ("search_web", "Find recent news about solar panels.")])
def test_forced_tool_calls_follow_the_schema(sdk, choice, ask):
    tool_choice = choice
    if choice != "required":
        tool_choice = {"type": "function", "function": {"name": choice}}
    body = dict(model=MODEL, messages=[{"role": "user", "content": ask}], tools=TOOLS, tool_choice=tool_choice,
                parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=0)
    r = sdk.chat.completions.create(**body)
    calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls or []]
    streamed, finish = streamed_calls(sdk, **body)
    for got, reason in ((calls, r.choices[0].finish_reason), (streamed, finish)):
        assert reason == "tool_calls" and len(got) == 1
        if choice != "required":
            assert got[0][0] == choice
        check_arguments(*got[0])
    assert [json.loads(a) for _, a in streamed] == [json.loads(a) for _, a in calls]


def test_required_with_parallel_calls(sdk):
    """More calls may follow the first (a small model may write calls until the token limit): each one returned
    follows its schema."""
    r = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo and Rome?"}],
                                    tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("tool_calls", "length") and len(choice.message.tool_calls) >= 1
    for call in choice.message.tool_calls:
        check_arguments(call.function.name, call.function.arguments)
