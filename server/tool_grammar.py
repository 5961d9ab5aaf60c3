"""Grammars for forced tool calls (``tool_choice`` "required" or a named function), in llguidance's
Lark syntax.

The prompt already ends with the opening of a call (the format's ``forced_prefix``); the grammar
covers the rest of the answer: complete calls in the model family's format, to the named function
or one of the tools, with arguments that follow the tool's JSON schema, then the end of the answer.
With ``"required"`` and ``parallel_tool_calls`` more calls may follow the first.

JSON arguments are embedded as ``%json`` schemas. The XML formats (GLM-4.5, Qwen3-Coder) write
each argument on its own: a string argument as free text up to the closing marker (or one of its
``enum`` values), any other as JSON following the argument's schema. Markers that are special
tokens of the model's vocabulary are written as token references, since their text alone cannot
produce them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from mtpserve.engine.grammar import COMPACT_JSON_OPTIONS
from mtpserve.server.tool_parsers.base import property_types
from mtpserve.server.tool_parsers.deepseek_v3 import CALL_BEGIN, CALL_END, CALLS_END, SEP

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
NEWLINE = '"\\n"'
REGEX_SPECIALS = set("\\.+*?()|[]{}^$#&-~/")

# a marker's text -> how the grammar writes it (a string literal, or a special token's reference)
Mark = Callable[[str], str]


def lit(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def regex_escape(text: str) -> str:
    """``text`` matched literally inside ``/.../`` (only the characters the syntax reserves)."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
            continue
        if ch in REGEX_SPECIALS:
            out.append("\\")
        out.append(ch)
    return "".join(out)


def parameters(function: dict) -> dict:
    """A tool's argument schema; a tool that declares none takes no arguments."""
    return function.get("parameters") or NO_ARGUMENTS


def with_definitions(schema: dict, root: dict) -> dict:
    """``schema`` carrying ``root``'s definitions, so its ``$ref``s resolve where it is embedded."""
    schema = dict(schema)
    for key in ("$defs", "definitions"):
        if key in root and key not in schema:
            schema[key] = root[key]
    return schema


def json_rule(schema: dict, root: dict | None = None) -> str:
    """A ``%json`` rule written compactly (``root``: the schema whose definitions ``schema`` may
    refer to). Lenient: keywords llguidance does not implement (``uniqueItems``, unknown string
    formats) are not enforced rather than refusing the request, as tool schemas often carry them."""
    if root is not None:
        schema = with_definitions(schema, root)
    schema = {**schema, "x-guidance": {**COMPACT_JSON_OPTIONS, "lenient": True}}
    return "%json " + json.dumps(schema, ensure_ascii=False)


class ToolGrammar:
    """The grammar of one request's forced calls. ``tools``: name -> function definition;
    ``function``: the named function, or None for any of the tools; ``parallel``: whether more
    than one call may be made."""

    def __init__(self, tools: dict[str, dict], function: str | None, parallel: bool, mark: Mark):
        self.tools = tools
        self.function = function
        self.parallel = parallel and function is None
        self.mark = mark
        self.rules: list[str] = []

    def build(self, format_name: str) -> str:
        build = getattr(self, format_name)
        start = build()
        return "\n".join([f"start: {start}", *self.rules])

    def more(self, separator: str) -> str:
        """Further calls after the first, each opened by ``separator``, when allowed."""
        if not self.parallel:
            return ""
        return f" ({separator} call)*"

    def choices(self, make: Callable[[str, dict, int], str]) -> str:
        """A ``call`` rule with one alternative per tool, ``make(name, function, index)`` each."""
        names = list(self.tools)
        alternatives = [make(name, self.tools[name], i) for i, name in enumerate(names)]
        self.rules.append("call: " + " | ".join(alternatives))
        return "call"

    # --- JSON formats

    def hermes(self) -> str:
        close = self.mark("</tool_call>")
        if self.function is not None:  # the prompt ends with '... "arguments": '
            self.rules.append("args: " + json_rule(parameters(self.tools[self.function])))
            return f'args {lit("}")} {NEWLINE} {close}'
        bodies = []
        for i, (name, function) in enumerate(self.tools.items()):
            arguments = parameters(function)
            body = {"type": "object", "additionalProperties": False,
                    "required": ["name", "arguments"],
                    "properties": {"name": {"const": name}, "arguments": arguments}}
            self.rules.append(f"body{i}: " + json_rule(body, arguments))
            bodies.append(f"body{i}")
        self.rules.append(f"call: ({' | '.join(bodies)}) {NEWLINE} {close}")
        separator = f'{NEWLINE} {self.mark("<tool_call>")} {NEWLINE}'
        return "call" + self.more(separator)

    def deepseek_v3(self) -> str:
        end = lit("\n```") + " " + self.mark(CALL_END)
        calls_end = self.mark(CALLS_END)
        if self.function is not None:  # the prompt ends with "NAME\n```json\n"
            self.rules.append("args: " + json_rule(parameters(self.tools[self.function])))
            return f"args {end} {calls_end}"

        def one(name: str, function: dict, i: int) -> str:
            self.rules.append(f"args{i}: " + json_rule(parameters(function)))
            return lit(name + "\n```json\n") + f" args{i} {end}"
        self.choices(one)
        separator = f'{self.mark(CALL_BEGIN)} {lit("function")} {self.mark(SEP)}'
        return "call" + self.more(separator) + " " + calls_end

    # --- XML formats

    def glm45(self) -> str:
        close = self.mark("</tool_call>")
        value_close = self.mark("</arg_value>")
        self.rules.append(self.text_rule("text", "</arg_value>"))

        def pair(key: str, schema: dict, json_value: bool, function: str) -> str:
            head = f'{self.mark("<arg_key>")} {lit(key)} {self.mark("</arg_key>")} ' \
                   f'{NEWLINE} {self.mark("<arg_value>")}'
            value = self.value(function, key, schema, value_close, json_value)
            return f"{head} {value} {NEWLINE}"

        if self.function is not None:  # the prompt ends with "<tool_call>NAME\n"
            return f"{self.arguments(self.function, pair)} {close}"

        def one(name: str, function: dict, i: int) -> str:
            return lit(name + "\n") + f" {self.arguments(name, pair)} {close}"
        self.choices(one)
        return "call" + self.more(f'{NEWLINE} {self.mark("<tool_call>")}')

    def qwen3_coder(self) -> str:
        close = self.mark("</tool_call>")
        value_close = lit("\n</parameter>")
        self.rules.append(self.text_rule("text", "\n</parameter>"))

        def pair(key: str, schema: dict, json_value: bool, function: str) -> str:
            value = self.value(function, key, schema, value_close, json_value)
            return lit(f"<parameter={key}>\n") + f" {value} {NEWLINE}"

        end = lit("</function>\n") + " " + close
        if self.function is not None:  # the prompt ends with "<tool_call>\n<function=NAME>\n"
            return f"{self.arguments(self.function, pair)} {end}"

        def one(name: str, function: dict, i: int) -> str:
            return lit(name + ">\n") + f" {self.arguments(name, pair)} {end}"
        self.choices(one)
        separator = f'{NEWLINE} {self.mark("<tool_call>")} ' + lit("\n<function=")
        return "call" + self.more(separator)

    def arguments(self, name: str, pair: Callable) -> str:
        """The argument pairs of ``name`` in the schema's order, the required ones mandatory."""
        schema = parameters(self.tools[name])
        required = set(schema.get("required") or [])
        parts = []
        for key, prop in (schema.get("properties") or {}).items():
            if not isinstance(prop, dict):
                prop = {}
            json_value = "string" not in property_types(self.tools, name, key)
            text = pair(key, prop, json_value, name)
            if key not in required:
                text = f"({text})?"
            parts.append(text)
        if not parts:
            return '""'
        return " ".join(parts)

    def value(self, function: str, key: str, schema: dict, close: str, json_value: bool) -> str:
        """One argument's value and its closing marker: JSON by the schema, else text."""
        if json_value:
            rule = f"v{len(self.rules)}"
            self.rules.append(f"{rule}: " + json_rule(schema, parameters(self.tools[function])))
            return f"{rule} {close}"
        choices = schema.get("enum")
        if "const" in schema:
            choices = [schema["const"]]
        if choices and all(isinstance(c, str) for c in choices):
            return "(" + " | ".join(lit(c) for c in choices) + f") {close}"
        return "text"

    def text_rule(self, name: str, close: str) -> str:
        """``name``: any text up to and including the marker ``close``."""
        written = self.mark(close)
        if not written.startswith('"'):  # a special token: text cannot contain it
            return f"{name}: /(?s:.*)/ {written}"
        return f"{name}[lazy]: /(?s:.*){regex_escape(close)}/"


def tool_call_grammar(format_name: str, tools: dict[str, dict], function: str | None,
                      parallel: bool, mark: Mark) -> str:
    """The Lark grammar of the text after the forced prefix."""
    return ToolGrammar(tools, function, parallel, mark).build(format_name)
