"""Forced tool-call grammars, format by format: the text a model would write after the forced prefix
is accepted to its end and parses into the expected call; arguments off the schema, functions
other than the forced one and text after the calls are refused. Markers that are special tokens
are produced only as those tokens."""

from __future__ import annotations

import json

import llguidance
import pytest
from conftest import EOS_ID, build_tokenizer
from tokenizers import AddedToken

from mtpserve.engine.grammar import lark_grammar
from mtpserve.server.chat_output import OutputSpec
from mtpserve.server.errors import APIError
from mtpserve.server.protocol import ChatCompletionRequest
from mtpserve.server.structured import forced_calls_grammar, marker_writer
from mtpserve.server.tool_calls import ToolCallExtractor
from mtpserve.server.tool_grammar import tool_call_grammar
from mtpserve.server.tool_parsers import FORMATS
from mtpserve.server.tool_parsers.deepseek_v3 import CALL_BEGIN, CALL_END, CALLS_END, SEP

TOOLS = {
    "get_weather": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city", "days"], "additionalProperties": False, "properties": {
            "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 9},
            "unit": {"enum": ["C", "F"], "type": "string"}}}},
    "search": {"name": "search", "parameters": {
        "type": "object", "required": ["query"], "properties": {"query": {"type": "string"}}}},
    "now": {"name": "now"},  # no parameters: no arguments
}
WEATHER = {"city": "Paris <b>", "days": 3}


def hermes(name: str, args: str) -> str:
    return f'{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def deepseek(name: str, args: str) -> str:
    return f"{name}\n```json\n{args}\n```{CALL_END}"


# (format, text after the "required" prefix, text after the prefix naming get_weather, a second call)
FORMS = {
    "hermes": (hermes("get_weather", '{"city": "Paris <b>", "days": 3}'),
               '{"city": "Paris <b>", "days": 3}}\n</tool_call>',
               "\n<tool_call>\n" + hermes("now", "{}")),
    "deepseek_v3": (deepseek("get_weather", '{"city": "Paris <b>", "days": 3}') + CALLS_END,
                    '{"city": "Paris <b>", "days": 3}\n```' + CALL_END + CALLS_END,
                    f"{CALL_BEGIN}function{SEP}" + deepseek("now", "{}")),
    "glm45": ("get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris <b></arg_value>\n<arg_key>days</arg_key>\n"
              "<arg_value>3</arg_value>\n</tool_call>",
              "<arg_key>city</arg_key>\n<arg_value>Paris <b></arg_value>\n<arg_key>days</arg_key>\n"
              "<arg_value>3</arg_value>\n</tool_call>",
              "\n<tool_call>now\n</tool_call>"),
    "qwen3_coder": ("get_weather>\n<parameter=city>\nParis <b>\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
                    "</function>\n</tool_call>",
                    "<parameter=city>\nParis <b>\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n"
                    "</tool_call>",
                    "\n<tool_call>\n<function=now>\n</function>\n</tool_call>"),
}


def make_tokenizer(special: tuple[str, ...] = ()):
    tok = build_tokenizer()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    ll = llguidance.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=[EOS_ID])
    return tok, ll


PLAIN = make_tokenizer()


def matcher(fmt: str, function, parallel: bool, tokenizers=PLAIN):
    tok, ll = tokenizers
    text = tool_call_grammar(fmt, TOOLS, function, parallel, marker_writer(tok, ll))
    m = llguidance.LLMatcher(ll, lark_grammar(text))
    assert not m.get_error(), m.get_error()
    return m


def accepts(m, tok, text: str) -> bool:
    """Whether the grammar takes all of ``text`` and may then end."""
    ids = tok.encode(text, add_special_tokens=False).ids
    return m.try_consume_tokens(ids) == len(ids) and not m.get_error() and m.is_accepting()


def parsed(fmt: str, function, text: str) -> list[tuple[str, dict]]:
    extractor = ToolCallExtractor(FORMATS[fmt], TOOLS)
    content, calls = extractor.feed(FORMATS[fmt].forced_prefix(function) + text)
    rest, more = extractor.finish()
    assert not (content + rest).strip()
    return [(c.name, json.loads(c.arguments)) for c in calls + more]


@pytest.mark.parametrize("fmt", sorted(FORMS))
def test_forced_calls_accepted_and_parsed(fmt):
    tok = PLAIN[0]
    required, named, second = FORMS[fmt]
    assert accepts(matcher(fmt, None, False), tok, required)
    assert parsed(fmt, None, required) == [("get_weather", WEATHER)]
    assert accepts(matcher(fmt, "get_weather", False), tok, named)
    assert parsed(fmt, "get_weather", named) == [("get_weather", WEATHER)]
    both = required + second
    if fmt == "deepseek_v3":  # the calls' section closes after the last call
        both = required.removesuffix(CALLS_END) + second + CALLS_END
    assert accepts(matcher(fmt, None, True), tok, both)
    assert parsed(fmt, None, both) == [("get_weather", WEATHER), ("now", {})]
    assert not accepts(matcher(fmt, None, False), tok, both)  # one call only


@pytest.mark.parametrize("fmt", sorted(FORMS))
def test_off_schema_arguments_are_refused(fmt):
    tok = PLAIN[0]
    required, named, _ = FORMS[fmt]
    wrong = [
        named.replace("3", "30"),           # days above its maximum
        named.replace("3", '"3"') if fmt in ("hermes", "deepseek_v3") else named.replace("3", "three"),
        named.replace("city", "town"),      # an unknown argument, the required one missing
    ]
    for text in wrong:
        assert not accepts(matcher(fmt, "get_weather", False), tok, text), text
    assert not accepts(matcher(fmt, None, False), tok, required.replace("get_weather", "get_news"))
    if fmt in ("glm45", "qwen3_coder"):  # an enum argument takes only its values
        unit = {"glm45": "<arg_key>unit</arg_key>\n<arg_value>{}</arg_value>\n",
                "qwen3_coder": "<parameter=unit>\n{}\n</parameter>\n"}[fmt]
        cut = named.index("</tool_call>" if fmt == "glm45" else "</function>")
        for value, ok in (("F", True), ("K", False)):
            text = named[:cut] + unit.format(value) + named[cut:]
            assert accepts(matcher(fmt, "get_weather", False), tok, text) == ok


def test_special_token_markers_are_written_as_tokens():
    """With <tool_call> and </tool_call> special tokens, the grammar takes the tokens, not their
    text spelled out in pieces."""
    tokenizers = make_tokenizer(("<tool_call>", "</tool_call>"))
    tok = tokenizers[0]
    required, _, second = FORMS["hermes"]
    assert accepts(matcher("hermes", None, True, tokenizers), tok, required + second)
    spelled = tok.encode(required.replace("</tool_call>", ""), add_special_tokens=False).ids
    spelled += PLAIN[0].encode("</tool_call>", add_special_tokens=False).ids
    m = matcher("hermes", None, True, tokenizers)
    assert m.try_consume_tokens(spelled) < len(spelled)


@pytest.mark.parametrize(("fmt", "good", "bad"), [
    ("hermes", '{"name": "f", "arguments": {"ref": {"a": 1}, "tags": ["x"]}}\n</tool_call>',
     '{"name": "f", "arguments": {"ref": {"a": "1"}, "tags": ["x"]}}\n</tool_call>'),
    ("qwen3_coder", 'f>\n<parameter=ref>\n{"a": 1}\n</parameter>\n<parameter=tags>\n["x"]\n</parameter>\n</function>\n'
     "</tool_call>",
     'f>\n<parameter=ref>\n{"a": "1"}\n</parameter>\n<parameter=tags>\n["x"]\n</parameter>\n</function>\n</tool_call>'),
])
def test_refs_resolve_and_unimplemented_keywords_pass(fmt, good, bad):
    """A $ref to the parameters' $defs resolves wherever the arguments are embedded; a keyword llguidance does not
    implement (uniqueItems) does not refuse the request."""
    params = {"type": "object", "required": ["ref", "tags"], "properties": {
        "ref": {"$ref": "#/$defs/Inner"}, "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
        "$defs": {"Inner": {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}}}
    tools = {"f": {"name": "f", "parameters": params}, "g": {"name": "g"}}
    tok, ll = PLAIN
    for text, ok in ((good, True), (bad, False)):
        m = llguidance.LLMatcher(ll, lark_grammar(tool_call_grammar(fmt, tools, None, False, marker_writer(tok, ll))))
        assert accepts(m, tok, text) == ok


def test_forced_call_and_response_format_conflict():
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tool_choice="required",
                                 tools=[{"type": "function", "function": {"name": "now"}}],
                                 response_format={"type": "json_object"})
    spec = OutputSpec(tool_format=FORMATS["hermes"], tools={"now": {"name": "now"}})
    with pytest.raises(APIError, match="response_format cannot be combined"):
        forced_calls_grammar(body, spec, *PLAIN)
