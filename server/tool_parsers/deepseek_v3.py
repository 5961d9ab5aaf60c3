"""DeepSeek-V3 calls: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
```json ARGS ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``; V3.1's shorter
``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`` is read too."""

from __future__ import annotations

import re

from mtpserve.server.tool_parsers.base import (
    ParsedCall,
    ToolFormat,
    arguments_json,
    check_name,
    json_object,
)

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
FENCED = re.compile(r"([^\n]*)\n```(?:json)?\n(.*)\n```\s*", re.DOTALL)


class DeepSeekV3Format(ToolFormat):
    name = "deepseek_v3"
    section_starts = (CALLS_BEGIN, CALL_BEGIN)
    call_open = CALL_BEGIN
    call_close = CALL_END
    fillers = (CALLS_BEGIN, CALLS_END)

    def parse_call(self, body: str, tools: dict[str, dict]) -> ParsedCall:
        head, sep, rest = body.partition(SEP)
        if not sep:
            raise ValueError("no tool separator")
        if head.strip() == "function":  # V3: the type, then the name and fenced JSON
            fenced = FENCED.fullmatch(rest)
            if fenced is None:
                raise ValueError("no ```json block")
            name = fenced.group(1)
            arguments = fenced.group(2)
        else:  # V3.1: the name, then the JSON
            name = head
            arguments = rest
        name = check_name(name.strip(), tools)
        return ParsedCall(name, arguments_json(json_object(arguments)))

    def forced_prefix(self, function: str | None) -> str:
        start = CALLS_BEGIN + CALL_BEGIN + "function" + SEP
        if function is None:
            return start
        return start + function + "\n```json\n"
