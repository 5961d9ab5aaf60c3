"""JSONL request files, one object a line with exactly one of "prompt" or "messages": the format of
``mtpserve generate --prompts-file`` and of the benchmarks' ``--prompts``."""

from __future__ import annotations

import json

from mtpserve.engine.errors import MtpserveError


def read_requests(path: str, fields: set[str], check=None) -> list[dict]:
    """The JSONL requests of ``path``: objects with one of "prompt" / "messages" and only
    ``fields``; ``check(item)`` may return a further error message for a line."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise MtpserveError(f"cannot read prompts file: {e}") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise MtpserveError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
            raise MtpserveError(f'{path}:{n}: each line needs exactly '
                                'one of "prompt" or "messages"')
        unknown = set(item) - fields
        if unknown:
            raise MtpserveError(f"{path}:{n}: unsupported field(s) {sorted(unknown)}")
        problem = check(item) if check else None
        if problem:
            raise MtpserveError(f"{path}:{n}: {problem}")
        items.append(item)
    if not items:
        raise MtpserveError(f"{path}: no requests")
    return items
