"""Tool-call formats, one module each; ``format_for`` picks one by name or from the chat
template."""

from __future__ import annotations

from mtpserve.server.tool_parsers.base import ParsedCall, ToolFormat
from mtpserve.server.tool_parsers.deepseek_v3 import CALLS_BEGIN, DeepSeekV3Format
from mtpserve.server.tool_parsers.glm45 import Glm45Format
from mtpserve.server.tool_parsers.hermes import HermesFormat
from mtpserve.server.tool_parsers.qwen3_coder import Qwen3CoderFormat

FORMATS = {f.name: f for f in (HermesFormat(), Glm45Format(), Qwen3CoderFormat(),
                                DeepSeekV3Format())}
PARSER_CHOICES = ("auto", *FORMATS)

__all__ = ["FORMATS", "PARSER_CHOICES", "ParsedCall", "ToolFormat", "detect", "format_for"]


def detect(template: str | None) -> str:
    """The format a chat template writes its tool calls in; Hermes when it shows none (the
    fallback that renders the tools into the system prompt teaches the model Hermes calls)."""
    text = template or ""
    if CALLS_BEGIN in text:
        return "deepseek_v3"
    if "<arg_key>" in text:
        return "glm45"
    if "<function=" in text:
        return "qwen3_coder"
    return "hermes"


def format_for(choice: str, template: str | None) -> ToolFormat:
    """``choice``: a format name or "auto" (from the template)."""
    if choice == "auto":
        choice = detect(template)
    return FORMATS[choice]
