"""The thinking of reasoning models cut out of their answer: text inside ``<think>...</think>``
goes to ``reasoning_content``, the rest to ``content``. A prompt that ends inside an open
``<think>`` (templates that open it for the model) starts the answer in the thinking."""

from __future__ import annotations

from mtpserve.server.tool_calls import held_back

OPEN, CLOSE = "<think>", "</think>"


def uses_thinking(template: str | None) -> bool:
    """Whether a chat template speaks of ``<think>`` (then its answers are split)."""
    return template is not None and OPEN in template


def ends_in_thinking(prompt: str) -> bool:
    """Whether the rendered prompt leaves a ``<think>`` open for the model to continue."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


class ReasoningSplitter:
    """``feed`` text, get (reasoning, content). ``<think>`` opens the thinking only at the start
    of the answer (whitespace aside); the whitespace after ``</think>`` is dropped."""

    def __init__(self, in_thinking: bool):
        self.in_thinking = in_thinking
        self.at_start = not in_thinking  # nothing but whitespace seen yet: <think> may open
        self.after_think = False          # content's leading whitespace is the block's separator
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.buffer += text
        reasoning: list[str] = []
        content: list[str] = []
        while self.buffer:
            if self.in_thinking:
                if not self._think(reasoning):
                    break
            elif self.at_start:
                if not self._start():
                    break
            else:
                self._content(content)
                break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """The text held back; a thinking never closed is all reasoning."""
        reasoning, content = self.feed("")
        rest = self.buffer
        self.buffer = ""
        if self.in_thinking:
            return reasoning + rest, content
        if self.after_think:
            rest = rest.lstrip()
        return reasoning, content + rest

    def _think(self, reasoning: list[str]) -> bool:
        end = self.buffer.find(CLOSE)
        if end >= 0:
            reasoning.append(self.buffer[:end])
            self.buffer = self.buffer[end + len(CLOSE):]
            self.in_thinking = False
            self.after_think = True
            return True
        keep = held_back(self.buffer, (CLOSE,))
        reasoning.append(self.buffer[:len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _start(self) -> bool:
        stripped = self.buffer.lstrip()
        if stripped.startswith(OPEN):
            self.buffer = stripped[len(OPEN):]
            self.in_thinking = True
            self.at_start = False
            return True
        if OPEN.startswith(stripped):  # whitespace or a partial <think>: wait
            return False
        self.at_start = False
        return True

    def _content(self, content: list[str]) -> None:
        if self.after_think:
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return
            self.after_think = False
        content.append(self.buffer)
        self.buffer = ""
