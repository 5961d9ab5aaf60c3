"""What every tool-call format shares: the markers around a call, the parsed call, and the
conversion of XML-style argument values by the tool's JSON schema."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON object, serialized as OpenAI sends it


class ToolFormat:
    """A model family's tool-call syntax. Text at one of ``section_starts`` begins the calls; each
    call is ``call_open`` BODY ``call_close``; ``fillers`` (and whitespace) may sit between calls.
    ``parse_call`` turns a BODY into a ParsedCall or raises ValueError."""

    name = ""
    section_starts: tuple[str, ...] = ()
    call_open = ""
    call_close = ""
    fillers: tuple[str, ...] = ()

    def parse_call(self, body: str, tools: dict[str, dict]) -> ParsedCall:
        raise NotImplementedError

    def forced_prefix(self, function: str | None) -> str:
        """The text that opens a call, up to the arguments of ``function`` when it is named; the
        prompt ends with it when tool_choice is "required" or a named function."""
        raise NotImplementedError


def json_object(text: str) -> dict:
    """``text`` parsed as a JSON object; ValueError for anything else."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("the arguments are not a JSON object")
    return value


def arguments_json(arguments: dict) -> str:
    return json.dumps(arguments, ensure_ascii=False)


def property_types(tools: dict[str, dict], function: str, key: str) -> list[str]:
    """The JSON-schema types the tool ``function`` declares for its argument ``key`` ([] when it
    says nothing)."""
    parameters = tools.get(function, {}).get("parameters") or {}
    schema = (parameters.get("properties") or {}).get(key)
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    return []


def convert_value(raw: str, types: list[str]):
    """An argument written as text (XML formats): kept as text for a string argument, else read
    as JSON (numbers, booleans, objects, arrays), falling back to the text."""
    if "string" in types:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def tagged_arguments(pattern: re.Pattern, text: str, tools: dict[str, dict], function: str,
                     clean=None) -> dict:
    """The arguments of a call that writes each one as a ``pattern`` match (key, raw value) in
    ``text``, converted to the types the tool's schema gives (``clean``: applied to each raw value
    first). Text between or after the arguments makes the call malformed."""
    arguments = {}
    end = 0
    for match in pattern.finditer(text):
        if text[end:match.start()].strip():
            raise ValueError("text between arguments")
        key = match.group(1).strip()
        value = match.group(2)
        if clean is not None:
            value = clean(value)
        arguments[key] = convert_value(value, property_types(tools, function, key))
        end = match.end()
    if text[end:].strip():
        raise ValueError("an unfinished or malformed argument")
    return arguments


def check_name(name, tools: dict[str, dict]) -> str:
    """``name`` when it is one of the request's tools; ValueError otherwise (the text of a call
    to a function nobody declared stays content)."""
    if not isinstance(name, str) or name not in tools:
        raise ValueError(f"no tool named {name!r}")
    return name
