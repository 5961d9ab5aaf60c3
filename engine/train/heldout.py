"""The held-out records of a ``train-head`` run as a bench prompts file, ``data/heldout.jsonl``, so
the rule that chooses a head (its acceptance measured in the engine on the held-out sets) is one
command:

    mtpserve bench --sections acceptance --prompts RUN/data/heldout.jsonl --mtp-head RUN ...

Kinds are ``builtin-<kind>`` (the built-in eval split) and ``magpie-<kind>`` (held-out Magpie
conversations, by the kind their seed asked for).
"""

from __future__ import annotations

import json
import os

FILE = "heldout.jsonl"


def magpie_messages(record: dict, first_answers: dict, tokenizer) -> list[dict] | None:
    """The conversation a Magpie record answers: its user turns and, for a follow-up, the answer to
    its first turn (from the record of that turn, ``first_answers``: first user turn -> answer
    ids). None when it cannot be rebuilt exactly (the rebuilt prompt must encode to the record's)."""
    users = record["user"]
    messages = [{"role": "user", "content": users[0]}]
    if len(users) > 1:
        answer = first_answers.get(users[0])
        if answer is None:
            return None
        text = tokenizer.decode(answer[:-1])  # without its end-of-turn token, as magpie.py sends it
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": users[1]}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    if ids != record["prompt_ids"]:
        return None
    return messages


def heldout_lines(builtin_prompts: list, magpie_eval: list[dict], tokenizer,
                  max_tokens: int) -> list[dict]:
    """Bench prompt lines of the built-in eval prompts (``prompts.Prompt``) and the held-out Magpie
    records that can be rebuilt. A follow-up's first turn is held out with it (the split goes by
    the first user turn) and comes before it, so it is among ``magpie_eval``."""
    lines = []
    for p in builtin_prompts:
        lines.append({"kind": f"builtin-{p.kind}", "messages": p.messages,
                      "max_tokens": p.max_tokens})
    first_answers = {}
    for r in magpie_eval:
        if len(r["user"]) == 1:
            first_answers[r["user"][0]] = r["output_ids"]
    for r in magpie_eval:
        messages = magpie_messages(r, first_answers, tokenizer)
        if messages is not None:
            lines.append({"kind": f"magpie-{r['kind']}", "messages": messages,
                          "max_tokens": max_tokens})
    return lines


def write_heldout(folder: str, lines: list[dict]) -> str:
    path = os.path.join(folder, FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path
