"""GLM-4.5 calls: the name, then each argument as XML
``<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n</tool_call>``."""

from __future__ import annotations

import re

from mtpserve.server.tool_parsers.base import (
    ParsedCall,
    ToolFormat,
    arguments_json,
    check_name,
    convert_value,
    property_types,
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
        arguments = {}
        end = 0
        for match in PAIR.finditer(rest):
            if rest[end:match.start()].strip():
                raise ValueError("text between arguments")
            key = match.group(1).strip()
            arguments[key] = convert_value(match.group(2), property_types(tools, name, key))
            end = match.end()
        if rest[end:].strip():
            raise ValueError("an unfinished or malformed argument")
        return ParsedCall(name, arguments_json(arguments))

    def forced_prefix(self, function: str | None) -> str:
        if function is None:
            return "<tool_call>"
        return f"<tool_call>{function}\n"
