"""One chat choice's generated text turned into what OpenAI clients read: ``reasoning_content``,
``content`` and ``tool_calls``, as stream deltas or one message."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtpserve.server.reasoning import ReasoningSplitter
from mtpserve.server.tool_calls import ToolCallExtractor, call_id
from mtpserve.server.tool_parsers import ToolFormat


@dataclass
class OutputSpec:
    """How a request's answers are read (one per request, set by the route)."""

    reasoning: bool = False            # split <think>...</think> into reasoning_content
    starts_in_thinking: bool = False   # the prompt leaves a <think> open
    tool_format: ToolFormat | None = None  # None: no tools, no parsing
    tools: dict[str, dict] = field(default_factory=dict)  # name -> function definition
    prefix: str = ""                   # text the prompt ends with that belongs to the answer
    single_call: bool = False          # a named tool_choice, or parallel_tool_calls false


class ChatOutput:
    """``feed`` text deltas and ``finish``; each returns a delta dict (maybe empty)."""

    def __init__(self, spec: OutputSpec):
        self.spec = spec
        self.splitter = None
        if spec.reasoning:
            self.splitter = ReasoningSplitter(spec.starts_in_thinking)
        self.extractor = None
        if spec.tool_format is not None:
            self.extractor = ToolCallExtractor(spec.tool_format, spec.tools)
        self.num_calls = 0
        self.pending = spec.prefix

    def feed(self, text: str) -> dict:
        text = self.pending + text
        self.pending = ""
        reasoning = ""
        content = text
        if self.splitter is not None:
            reasoning, content = self.splitter.feed(text)
        return self._delta(reasoning, content, final=False)

    def finish(self) -> dict:
        delta = self.feed("")
        reasoning = ""
        content = ""
        if self.splitter is not None:
            reasoning, content = self.splitter.finish()
        more = self._delta(reasoning, content, final=True)
        return merge(delta, more)

    def _delta(self, reasoning: str, content: str, final: bool) -> dict:
        calls = []
        if self.extractor is not None:
            content, calls = self.extractor.feed(content)
            if final:
                rest, more = self.extractor.finish()
                content += rest
                calls += more
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        entries = self._call_entries(calls)
        if entries:
            delta["tool_calls"] = entries
        return delta

    def _call_entries(self, calls) -> list[dict]:
        entries = []
        for call in calls:
            if self.spec.single_call and self.num_calls:
                break
            entries.append({"index": self.num_calls, "id": call_id(), "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments}})
            self.num_calls += 1
        return entries


def merge(a: dict, b: dict) -> dict:
    """Two deltas as one: texts joined, tool calls in order."""
    out = dict(a)
    for key, value in b.items():
        if key in out:
            out[key] = out[key] + value
        else:
            out[key] = value
    return out


def finish_reason(output: ChatOutput, reason: str | None) -> str | None:
    """"tool_calls" for an answer that stopped after calling tools."""
    if output.num_calls and reason == "stop":
        return "tool_calls"
    return reason


def message(spec: OutputSpec, delta: dict) -> dict:
    """The non-stream message from the whole answer's delta."""
    out = {"role": "assistant", "content": delta.get("content")}
    calls = delta.get("tool_calls")
    if calls:
        out["tool_calls"] = calls
        if out["content"] is not None and not out["content"].strip():
            out["content"] = None
    elif out["content"] is None:
        out["content"] = ""
    if spec.reasoning:
        out["reasoning_content"] = delta.get("reasoning_content")
    return out
