"""Hermes-style calls (Qwen2.5, Qwen3 and many others):
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

from __future__ import annotations

import json

from mtpserve.server.tool_parsers.base import (
    ParsedCall,
    ToolFormat,
    arguments_json,
    check_name,
    json_object,
)


class HermesFormat(ToolFormat):
    name = "hermes"
    section_starts = ("<tool_call>",)
    call_open = "<tool_call>"
    call_close = "</tool_call>"

    def parse_call(self, body: str, tools: dict[str, dict]) -> ParsedCall:
        call = json_object(body.strip())
        name = check_name(call.get("name"), tools)
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            arguments = json_object(arguments)
        if not isinstance(arguments, dict):
            raise ValueError("the arguments are not a JSON object")
        return ParsedCall(name, arguments_json(arguments))

    def forced_prefix(self, function: str | None) -> str:
        if function is None:
            return "<tool_call>\n"
        return '<tool_call>\n{"name": ' + json.dumps(function) + ', "arguments": '
