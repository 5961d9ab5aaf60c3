"""Qwen3-Coder and Qwen3.5 calls: ``<tool_call>\\n<function=NAME>\\n<parameter=K>\\nV\\n</parameter>
\\n</function>\\n</tool_call>``."""

from __future__ import annotations

import re

from mtpserve.server.tool_parsers.base import (
    ParsedCall,
    ToolFormat,
    arguments_json,
    check_name,
    tagged_arguments,
)

FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.DOTALL)
PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def strip_newline(value: str) -> str:
    """The value without the one newline the format puts on each side of it."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


class Qwen3CoderFormat(ToolFormat):
    name = "qwen3_coder"
    section_starts = ("<tool_call>",)
    call_open = "<tool_call>"
    call_close = "</tool_call>"

    def parse_call(self, body: str, tools: dict[str, dict]) -> ParsedCall:
        function = FUNCTION.fullmatch(body)
        if function is None:
            raise ValueError("no <function=...> block")
        name = check_name(function.group(1).strip(), tools)
        inner = function.group(2)
        arguments = tagged_arguments(PARAMETER, inner, tools, name, clean=strip_newline)
        return ParsedCall(name, arguments_json(arguments))

    def forced_prefix(self, function: str | None) -> str:
        if function is None:
            return "<tool_call>\n<function="
        return f"<tool_call>\n<function={function}>\n"
