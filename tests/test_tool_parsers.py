"""Tool-call formats and the reasoning split on fixed strings: whole, cut into pieces of every size
(streaming), malformed and unfinished."""

from __future__ import annotations

import json

import pytest

from mtpserve.server.chat_output import ChatOutput, OutputSpec, finish_reason, merge, message
from mtpserve.server.reasoning import ReasoningSplitter, ends_in_thinking
from mtpserve.server.tool_calls import ToolCallExtractor, held_back
from mtpserve.server.tool_parsers import FORMATS, detect

TOOLS = {
    "get_weather": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"},
        "options": {"type": "object"}}}},
    "search": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}}}},
}
PARIS = {"city": "Paris", "days": 3}
CODES = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
         "<｜tool▁calls▁end｜>")


def deepseek(name: str, args: str) -> str:
    return f"{CODES[1]}function{CODES[2]}{name}\n```json\n{args}\n```{CODES[3]}"


# (format, model text, expected content, expected [(name, arguments)])
CASES = [
    ("hermes", 'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
               '</tool_call>', "I will check.\n", [("get_weather", PARIS)]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
               '<tool_call>\n{"name": "search", "arguments": "{\\"query\\": \\"rain\\"}"}\n</tool_call>', "",
     [("get_weather", PARIS), ("search", {"query": "rain"})]),
    ("glm45", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>"
              "\n<arg_value>3</arg_value>\n</tool_call>", "", [("get_weather", PARIS)]),
    ("glm45", "<tool_call>get_weather\n<arg_key>zip</arg_key>\n<arg_value>75001</arg_value>\n<arg_key>options</arg_key>"
              '\n<arg_value>{"unit": "C"}</arg_value>\n</tool_call>', "",
     [("get_weather", {"zip": "75001", "options": {"unit": "C"}})]),
    ("qwen3_coder", "Let me look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>", "Let me look.\n",
     [("get_weather", PARIS)]),
    ("qwen3_coder", "<tool_call>\n<function=search>\n<parameter=query>\nline one\nline two\n</parameter>\n</function>\n"
                    "</tool_call>", "", [("search", {"query": "line one\nline two"})]),
    ("deepseek_v3", CODES[0] + deepseek("get_weather", '{"city": "Paris", "days": 3}')
     + deepseek("search", '{"query": "rain"}') + CODES[4], "", [("get_weather", PARIS), ("search", {"query": "rain"})]),
    ("deepseek_v3", f'{CODES[0]}{CODES[1]}search{CODES[2]}{{"query": "rain"}}{CODES[3]}{CODES[4]}', "",
     [("search", {"query": "rain"})]),  # V3.1's layout
]


def run(fmt: str, text: str, step: int):
    extractor = ToolCallExtractor(FORMATS[fmt], TOOLS)
    content, calls = "", []
    for i in range(0, len(text), step):
        more, new = extractor.feed(text[i:i + step])
        content += more
        calls += new
    more, new = extractor.finish()
    calls += new
    return content + more, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
def test_formats_whole_and_in_pieces(fmt, text, content, calls, step):
    assert run(fmt, text, step) == (content, calls)


@pytest.mark.parametrize("fmt, text", [
    # not JSON: the block stays content, the text around it too
    ("hermes", "a <tool_call>\n{name: get_weather}\n</tool_call> b"),
    # a function nobody declared
    ("hermes", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'),
    # arguments not an object
    ("hermes", '<tool_call>{"name": "search", "arguments": [1]}</tool_call>'),
    # an argument left open
    ("glm45", "<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>x</tool_call>"),
    ("qwen3_coder", "<tool_call>\n<function=search>\n<parameter=query>\nx\n</function>\n</tool_call>"),
    ("deepseek_v3", f"{CODES[1]}function{CODES[2]}search\n{{}}{CODES[3]}"),
    # a tag that only looks like the start
    ("hermes", "use <tool> or <tool_cal"),
])
def test_malformed_calls_stay_content(fmt, text):
    for step in (1, 3, 10_000):
        assert run(fmt, text, step) == (text, [])


def test_unclosed_last_call_is_parsed_at_the_end():
    text = '<tool_call>\n{"name": "search", "arguments": {"query": "rain"}}\n'
    assert run("hermes", text, 4) == ("", [("search", {"query": "rain"})])
    cut = '<tool_call>\n{"name": "search", "argu'  # the answer ran out of tokens inside the call
    assert run("hermes", cut, 4) == (cut, [])


def test_content_after_calls_and_partial_markers():
    text = '<tool_call>{"name": "search", "arguments": {"query": "a"}}</tool_call>\nDone.'
    assert run("hermes", text, 1) == ("Done.", [("search", {"query": "a"})])
    assert held_back("abc<tool_", ("<tool_call>",)) == 6
    assert held_back("abc<tool_x", ("<tool_call>",)) == 0


def test_detect_from_template():
    assert detect("{{ '<｜tool▁calls▁begin｜>' }}") == "deepseek_v3"
    assert detect("<tool_call>{{ name }}<arg_key>") == "glm45"
    assert detect("<tool_call>\n<function={{ name }}>") == "qwen3_coder"
    assert detect("<tool_call>\n{{ call | tojson }}") == "hermes"
    assert detect(None) == "hermes"


@pytest.mark.parametrize("in_thinking, text, reasoning, content", [
    (False, "<think>\nplan it\n</think>\n\nThe answer.", "\nplan it\n", "The answer."),
    (False, "  <think>a</think>b", "a", "b"),
    (True, "step one</think>\n\nDone", "step one", "Done"),
    (True, "ran out of tokens", "ran out of tokens", ""),
    (False, "no thinking at all, <think> later stays", "", "no thinking at all, <think> later stays"),
    (False, "<thin", "", "<thin"),
])
def test_reasoning_split(in_thinking, text, reasoning, content):
    for step in (1, 2, 5, 10_000):
        splitter = ReasoningSplitter(in_thinking)
        got_r, got_c = "", ""
        for i in range(0, len(text), step):
            r, c = splitter.feed(text[i:i + step])
            got_r, got_c = got_r + r, got_c + c
        r, c = splitter.finish()
        assert (got_r + r, got_c + c) == (reasoning, content)


def test_ends_in_thinking():
    assert ends_in_thinking("<|im_start|>assistant\n<think>\n")
    assert not ends_in_thinking("<think>\n\n</think>\n\n")
    assert not ends_in_thinking("plain")


def test_chat_output_reasoning_then_call():
    spec = OutputSpec(reasoning=True, starts_in_thinking=True, tool_format=FORMATS["hermes"], tools=TOOLS)
    text = 'need weather</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    streamed = {}
    output = ChatOutput(spec)
    for ch in text:
        streamed = merge(streamed, output.feed(ch))
    streamed = merge(streamed, output.finish())
    assert streamed["reasoning_content"] == "need weather" and "content" not in streamed
    (call,) = streamed["tool_calls"]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert finish_reason(output, "stop") == "tool_calls" and finish_reason(output, "length") == "length"
    msg = message(spec, streamed)
    assert msg["content"] is None and msg["reasoning_content"] == "need weather"


def test_single_call_keeps_the_first():
    spec = OutputSpec(tool_format=FORMATS["hermes"], tools=TOOLS, single_call=True,
                      prefix='<tool_call>\n{"name": "search", "arguments": ')
    output = ChatOutput(spec)
    tail = '{"query": "a"}}\n</tool_call>\n<tool_call>{"name": "search", "arguments": {"query": "b"}}</tool_call>'
    delta = merge(output.feed(tail), output.finish())
    assert [c["function"]["arguments"] for c in delta["tool_calls"]] == ['{"query": "a"}']
