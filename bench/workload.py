"""What the benchmarks send: the built-in prompt set (held-out "eval" prompts of several kinds) or a
user's JSONL file, and long prompts of a given token count for prompt processing."""

from __future__ import annotations

import itertools
import json
import json.decoder
from dataclasses import dataclass, replace

from mtpserve.bench.requests_file import read_requests
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.train.prompts import KINDS, prompt_set

FILE_FIELDS = {"kind", "prompt", "messages", "max_tokens", "schema"}


@dataclass(frozen=True)
class BenchPrompt:
    kind: str
    max_tokens: int
    messages: tuple | None = None  # a conversation, rendered with the chat template
    prompt: str | None = None  # raw text, no template
    schema: dict | None = None  # the JSON schema of the answer asked for (the schema section)

    def chat_messages(self) -> list[dict]:
        if self.messages is not None:
            return list(self.messages)
        return [{"role": "user", "content": self.prompt}]

    @property
    def text(self) -> str:
        """Raw prompt text (for /v1/completions): the prompt, or the last message's content."""
        return self.prompt if self.prompt is not None else self.messages[-1]["content"]

    def token_ids(self, tokenizer) -> list[int]:
        if self.messages is not None:
            text = tokenizer.apply_chat_template(list(self.messages))
            return tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(self.prompt)


def check_line(item: dict) -> str | None:
    kind = item.get("kind")
    max_tokens = item.get("max_tokens", 128)
    messages = item.get("messages")
    if not isinstance(kind, str) or not kind:
        return '"kind" must be a non-empty string'
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        return '"max_tokens" must be a positive integer'
    if not isinstance(item.get("schema", {}), dict):
        return '"schema" must be a JSON schema object'
    if messages is None:
        if not isinstance(item["prompt"], str):
            return '"prompt" must be a string'
        return None
    is_list = isinstance(messages, list) and len(messages) > 0
    if not is_list or not all(isinstance(m, dict) and "content" in m for m in messages):
        return '"messages" must be a list of {"role", "content"} objects'
    return None


def read_prompts_file(path: str) -> list[BenchPrompt]:
    """JSONL, one prompt a line: {"kind": ..., "prompt": ...} or {"kind": ..., "messages": [...]},
    optional "max_tokens" (default 128) and "schema" (the JSON schema of the answer asked for)."""
    prompts = []
    for item in read_requests(path, FILE_FIELDS, check_line):
        messages = tuple(item["messages"]) if "messages" in item else None
        prompts.append(BenchPrompt(item["kind"], item.get("max_tokens", 128), messages,
                                   item.get("prompt"), item.get("schema")))
    return prompts


def load_prompts(path: str | None, kinds: list[str] | None, per_kind: int | None,
                 max_tokens: int | None = None) -> list[BenchPrompt]:
    """The prompts of ``kinds`` (all when None), at most ``per_kind`` of each, from ``path`` or the
    built-in eval set, kinds taking turns (so any first few mix them); ``max_tokens`` caps every
    prompt's own."""
    if path:
        prompts = read_prompts_file(path)
        known = sorted({p.kind for p in prompts})
    else:
        known = list(KINDS)
        chosen = [k for k in known if kinds is None or k in kinds]
        eval_set = prompt_set("eval", chosen, per_kind)
        prompts = [BenchPrompt(p.kind, p.max_tokens, tuple(p.messages)) for p in eval_set]
    missing = sorted(set(kinds or ()) - set(known))
    if missing:
        raise MtpserveError(f"no prompts of kind(s) {missing}; available: {', '.join(known)}")
    groups: dict[str, list[BenchPrompt]] = {}
    for p in prompts:
        if kinds is None or p.kind in kinds:
            group = groups.setdefault(p.kind, [])
            if per_kind is None or len(group) < per_kind:
                group.append(capped(p, max_tokens))
    return take_turns(list(groups.values()))


def capped(p: BenchPrompt, max_tokens: int | None) -> BenchPrompt:
    """``p`` with its max_tokens capped at ``max_tokens`` (None: as it is)."""
    if max_tokens is None:
        return p
    return replace(p, max_tokens=min(p.max_tokens, max_tokens))


def take_turns(groups: list[list]) -> list:
    """The first of every group, then the second of every group, ...; short groups drop out."""
    out = []
    for turn in itertools.zip_longest(*groups):
        out += [p for p in turn if p is not None]
    return out


def long_prompt_ids(tokenizer, num_tokens: int) -> list[int]:
    """Exactly ``num_tokens`` token ids of ordinary text (Python source, repeated as needed)."""
    with open(json.decoder.__file__, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise MtpserveError("the tokenizer produced no tokens for the prompt-processing text")
    return (ids * (num_tokens // len(ids) + 1))[:num_tokens]
