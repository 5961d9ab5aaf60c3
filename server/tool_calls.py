"""Tool calls cut out of generated text as it arrives: content is passed on until a format's
section start appears, then each complete call is parsed and handed out whole (one OpenAI
tool-call delta per call). A call that does not parse stays content, so nothing the model wrote
is lost; the same code serves streamed and whole answers, so both give the same result."""

from __future__ import annotations

import uuid

from mtpserve.server.tool_parsers import ParsedCall, ToolFormat


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could begin one of ``markers``."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker.startswith(text[-size:]):
                longest = size
                break
    return longest


class ToolCallExtractor:
    """``feed`` text, get (content, calls); ``finish`` at the end of the answer."""

    def __init__(self, fmt: ToolFormat, tools: dict[str, dict]):
        self.fmt = fmt
        self.tools = tools
        self.buffer = ""
        self.in_calls = False
        self.after_call = False  # the last thing taken was a parsed call

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self.buffer += text
        content: list[str] = []
        calls: list[ParsedCall] = []
        while self.buffer:
            if not self.in_calls:
                if not self._enter_calls(content):
                    break
            elif not self._take_call(content, calls):
                break
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """The text held back: an unclosed last call is parsed as if closed (a model may stop
        right after its arguments), else it is content."""
        content, calls = self.feed("")
        rest = self.buffer
        self.buffer = ""
        if not self.in_calls:
            return content + rest, calls
        stripped = rest.strip()
        if not stripped or stripped in self.fmt.fillers:
            return content, calls
        if stripped.startswith(self.fmt.call_open):
            call = self._parse(stripped[len(self.fmt.call_open):])
            if call is not None:
                return content, [*calls, call]
        return content + rest, calls

    def _enter_calls(self, content: list[str]) -> bool:
        """Pass content on up to a section start (then True), holding back a partial one."""
        starts = [(self.buffer.find(s), s) for s in self.fmt.section_starts]
        found = [(i, s) for i, s in starts if i >= 0]
        if found:
            i = min(found)[0]
            content.append(self.buffer[:i])
            self.buffer = self.buffer[i:]
            self.in_calls = True
            return True
        keep = held_back(self.buffer, self.fmt.section_starts)
        content.append(self.buffer[:len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _take_call(self, content: list[str], calls: list[ParsedCall]) -> bool:
        """Consume one complete call, filler or whitespace (True); False to wait for more."""
        fmt = self.fmt
        stripped = self.buffer.lstrip()
        if not stripped:
            return False
        for filler in fmt.fillers:
            if stripped.startswith(filler):
                self.buffer = stripped[len(filler):]
                return True
        if stripped.startswith(fmt.call_open):
            end = stripped.find(fmt.call_close, len(fmt.call_open))
            if end < 0:
                return False
            body = stripped[len(fmt.call_open):end]
            block_end = end + len(fmt.call_close)
            call = self._parse(body)
            if call is None:
                content.append(self.buffer[:len(self.buffer) - len(stripped) + block_end])
            else:
                calls.append(call)
            self.after_call = call is not None
            self.buffer = stripped[block_end:]
            return True
        markers = (fmt.call_open, *fmt.fillers)
        if any(m.startswith(stripped) for m in markers):
            return False
        if self.after_call:  # the whitespace separating the calls from the text after them
            self.buffer = stripped
        self.in_calls = False  # text after the calls: content again
        return True

    def _parse(self, body: str) -> ParsedCall | None:
        try:
            return self.fmt.parse_call(body, self.tools)
        except ValueError:
            return None
