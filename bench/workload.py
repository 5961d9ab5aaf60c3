"""What the benchmarks send: the built-in prompt set (held-out "eval" prompts of several kinds) or a user's JSONL
file, and long prompts of a given token count for prompt processing."""

from __future__ import annotations

import itertools
import json
import json.decoder
from dataclasses import dataclass

from mtpserve.bench.requests_file import read_requests
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.train.prompts import KINDS, prompt_set

FILE_FIELDS = {"kind", "prompt", "messages", "max_tokens"}


@dataclass(frozen=True)
class BenchPrompt:
    kind: str
    max_tokens: int
    messages: tuple | None = None  # a conversation, rendered with the chat template
    prompt: str | None = None  # raw text, no template

    def chat_messages(self) -> list[dict]:
        return list(self.messages) if self.messages is not None else [{"role": "user", "content": self.prompt}]

    @property
    def text(self) -> str:
        """Raw prompt text (for /v1/completions): the prompt, or the last message's content."""
        return self.prompt if self.prompt is not None else self.messages[-1]["content"]

    def token_ids(self, tokenizer) -> list[int]:
        if self.messages is not None:
            return tokenizer.encode(tokenizer.apply_chat_template(list(self.messages)), add_special_tokens=False)
        return tokenizer.encode(self.prompt)


def check_line(item: dict) -> str | None:
    kind, max_tokens, messages = item.get("kind"), item.get("max_tokens", 128), item.get("messages")
    if not isinstance(kind, str) or not kind:
        return '"kind" must be a non-empty string'
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        return '"max_tokens" must be a positive integer'
    if messages is None:
        return None if isinstance(item["prompt"], str) else '"prompt" must be a string'
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "content" in m
                                                                 for m in messages):
        return '"messages" must be a list of {"role", "content"} objects'
    return None


def read_prompts_file(path: str) -> list[BenchPrompt]:
    """JSONL, one prompt a line: {"kind": ..., "prompt": ...} or {"kind": ..., "messages": [...]}, optional
    "max_tokens" (default 128)."""
    return [BenchPrompt(item["kind"], item.get("max_tokens", 128),
                        tuple(item["messages"]) if "messages" in item else None, item.get("prompt"))
            for item in read_requests(path, FILE_FIELDS, check_line)]


def load_prompts(path: str | None, kinds: list[str] | None, per_kind: int | None,
                 max_tokens: int | None = None) -> list[BenchPrompt]:
    """The prompts of ``kinds`` (all when None), at most ``per_kind`` of each, from ``path`` or the built-in
    eval set, kinds taking turns (so any first few mix them); ``max_tokens`` caps every prompt's own."""
    if path:
        prompts = read_prompts_file(path)
        known = sorted({p.kind for p in prompts})
    else:
        known = list(KINDS)
        chosen = [k for k in known if kinds is None or k in kinds]
        prompts = [BenchPrompt(p.kind, p.max_tokens, tuple(p.messages)) for p in prompt_set("eval", chosen, per_kind)]
    missing = sorted(set(kinds or ()) - set(known))
    if missing:
        raise MtpserveError(f"no prompts of kind(s) {missing}; available: {', '.join(known)}")
    groups: dict[str, list[BenchPrompt]] = {}
    for p in prompts:
        if kinds is None or p.kind in kinds:
            group = groups.setdefault(p.kind, [])
            if per_kind is None or len(group) < per_kind:
                group.append(p if max_tokens is None else
                             BenchPrompt(p.kind, min(p.max_tokens, max_tokens), p.messages, p.prompt))
    turns = itertools.zip_longest(*groups.values())
    return [p for turn in turns for p in turn if p is not None]


def long_prompt_ids(tokenizer, num_tokens: int) -> list[int]:
    """Exactly ``num_tokens`` token ids of ordinary text (Python source, repeated as needed)."""
    with open(json.decoder.__file__, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise MtpserveError("the tokenizer produced no tokens for the prompt-processing text")
    return (ids * (num_tokens // len(ids) + 1))[:num_tokens]
