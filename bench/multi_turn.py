"""The multi-turn workload of ``mtpserve bench-serve`` (``--workload multi-turn``): conversations that
grow turn by turn, the way a chat client or an agent resends its whole history every turn.

Each conversation opens with a system prompt of its own (about ``--system-tokens`` tokens of source
code, opening with the conversation's number so that no two share a cached block) and asks the prompt set's
questions one after another, sending each answer back as an assistant message before the next
question. Up to ``concurrency`` conversations run side by side; the turns of one conversation run in
order. TTFT, prompt tokens and (from ``usage.prompt_tokens_details``) cached tokens are reported per
turn: with prefix caching, a turn after the first computes only what the previous turn did not have.
"""

from __future__ import annotations

import asyncio
import json.decoder
import time
from dataclasses import dataclass

from mtpserve.bench.serve_bench import level_stats, one_request, scrape, stream_body
from mtpserve.bench.stats import summarize
from mtpserve.bench.workload import BenchPrompt

# for sizing the system prompt (the default model's tokenizer reads this text at about 3.5 characters a
# token); the report gives the server's own token counts
CHARS_PER_TOKEN = 3.5


@dataclass
class Conversation:
    index: int
    system: str
    questions: list[BenchPrompt]


def system_prompt(index: int, num_tokens: int) -> str:
    """About ``num_tokens`` tokens of ordinary text (Python source), opening with ``index`` (right after
    the chat template's few header tokens, so in the first block)."""
    with open(json.decoder.__file__, encoding="utf-8") as f:
        source = f.read()
    size = int(num_tokens * CHARS_PER_TOKEN)
    body = (source * (size // len(source) + 1))[:size]
    return f"[{index}] Answer questions about this file.\n{body}"


def conversations(prompts: list[BenchPrompt], count: int, turns: int,
                  system_tokens: int) -> list[Conversation]:
    """``count`` conversations of ``turns`` questions each, taken from ``prompts`` in turn."""
    out = []
    for i in range(count):
        questions = [prompts[(i * turns + t) % len(prompts)] for t in range(turns)]
        out.append(Conversation(i, system_prompt(i, system_tokens), questions))
    return out


def request_body(args, messages: list[dict], question: BenchPrompt) -> dict:
    body = stream_body(args, question.max_tokens)
    body["messages"] = list(messages)
    return body


async def converse(client, args, conversation: Conversation, per_turn: list[list[dict]]) -> None:
    """Run ``conversation``'s turns in order, each result into ``per_turn[turn]``; a failed turn
    ends the conversation."""
    messages = [{"role": "system", "content": conversation.system}]
    for turn, question in enumerate(conversation.questions):
        messages.append({"role": "user", "content": question.chat_messages()[-1]["content"]})
        result = await one_request(client, "/v1/chat/completions",
                                   request_body(args, messages, question), True)
        per_turn[turn].append(result)
        if "error" in result:
            return
        messages.append({"role": "assistant", "content": result["text"]})


def mean_of(values) -> float | None:
    xs = [x for x in values if x is not None]
    if not xs:
        return None
    return sum(xs) / len(xs)


def turn_stats(turn: int, results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    return {
        "turn": turn,
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "ttft_ms": summarize(r["ttft"] * 1000.0 for r in ok),
        "prompt_tokens": mean_of(r["prompt_tokens"] for r in ok),
        "cached_tokens": mean_of(r["cached_tokens"] for r in ok),
    }


async def run_level(client, args, prompts: list[BenchPrompt], concurrency: int) -> dict:
    """One concurrency level of the multi-turn workload: the usual figures over every turn, and
    per turn its TTFT, prompt and cached tokens."""
    chats = conversations(prompts, args.conversations, args.turns, args.system_tokens)
    per_turn: list[list[dict]] = [[] for _ in range(args.turns)]
    gate = asyncio.Semaphore(concurrency)

    async def gated(conversation):
        async with gate:
            await converse(client, args, conversation, per_turn)

    before = await scrape(client, args.metrics_url)
    start = time.perf_counter()
    await asyncio.gather(*(gated(c) for c in chats))
    duration = time.perf_counter() - start
    after = await scrape(client, args.metrics_url)
    results = []
    for turn_results in per_turn:
        results.extend(turn_results)
    level = level_stats(concurrency, results, duration, before, after)
    level["turns"] = [turn_stats(t + 1, r) for t, r in enumerate(per_turn)]
    return level
