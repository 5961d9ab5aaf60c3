"""GLM-4.5 calls: the name, then each argument as XML
``<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n</tool_call>``."""

from __future__ import annotations

import re

from mtpserve.server.tool_parsers.base import (
    ParsedCall,
    ToolFormat,
    arguments_json,
    check_name,
    tagged_arguments,
)

PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


class Glm45Format(ToolFormat):
    name = "glm45"
    section_starts = ("<tool_call>",)
    call_open = "<tool_call>"
    call_close = "</tool_call>"

    def parse_call(self, body: str, tools: dict[str, dict]) -> ParsedCall:
        head, _, _ = body.partition("<arg_key>")
        name = check_name(head.strip(), tools)
        rest = body[len(head):]
        arguments = tagged_arguments(PAIR, rest, tools, name)
        return ParsedCall(name, arguments_json(arguments))

    def forced_prefix(self, function: str | None) -> str:
        if function is None:
            return "<tool_call>"
        return f"<tool_call>{function}\n"
