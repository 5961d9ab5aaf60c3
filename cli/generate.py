"""``mtpserve generate``: offline generation from a prompt, a chat message or a JSONL file."""

from __future__ import annotations

import json
import sys

from mtpserve.bench.requests_file import read_requests
from mtpserve.cli.engine_args import engine_from_args
from mtpserve.engine.detokenizer import IncrementalDetokenizer
from mtpserve.engine.sampling_params import SamplingParams


def add_args(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw prompt text (no chat template)")
    src.add_argument("--chat", help="one user message, rendered with the model's chat template")
    src.add_argument("--prompts-file",
                     help='JSONL: {"prompt": ...} or {"messages": [...]} per line, '
                          "optionally with max_tokens, temperature, seed, ...")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the model's)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per request on stdout")
    p.add_argument("--concurrent", action="store_true",
                   help="run all requests of --prompts-file as one batch")


FILE_FIELDS = {"prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                "repetition_penalty", "presence_penalty", "frequency_penalty", "ignore_eos"}


def sampling_params(args, item: dict, defaults) -> SamplingParams:
    def pick(name, fallback):
        value = item.get(name, getattr(args, name, None))
        if value is None:
            value = getattr(defaults, name, None)
        return fallback if value is None else value

    return SamplingParams(
        max_tokens=pick("max_tokens", 128),
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=pick("top_k", 0),
        min_p=pick("min_p", 0.0),
        seed=pick("seed", None),
        repetition_penalty=pick("repetition_penalty", 1.0),
        presence_penalty=pick("presence_penalty", 0.0),
        frequency_penalty=pick("frequency_penalty", 0.0),
        ignore_eos=bool(pick("ignore_eos", False)),
    )


def result_json(req, tokenizer) -> dict:
    return {
        "text": tokenizer.decode(req.output_token_ids),
        "token_ids": req.output_token_ids,
        "prompt_token_ids": req.prompt_token_ids,
        "prompt_tokens": req.num_prompt_tokens,
        "completion_tokens": len(req.output_token_ids),
        "finish_reason": req.finish_reason,
        "metrics": {"speculative": req.spec_stats.to_dict(), "timings": req.timings()},
    }


def read_items(args) -> list[dict]:
    """The requests to run: the lines of --prompts-file, the --chat message or the --prompt."""
    if args.prompts_file:
        return read_requests(args.prompts_file, FILE_FIELDS)
    if args.chat is not None:
        return [{"messages": [{"role": "user", "content": args.chat}]}]
    return [{"prompt": args.prompt}]


def encode_item(tok, item: dict) -> list[int]:
    """A raw prompt with the special tokens, or the messages through the chat template."""
    if "prompt" in item:
        return tok.encode(item["prompt"], add_special_tokens=True)
    text = tok.apply_chat_template(item["messages"])
    return tok.encode(text, add_special_tokens=False)


def stream_text(engine, detok) -> None:
    """Step the engine until it is idle, writing the text of the one request as it comes."""
    while engine.has_unfinished_requests():
        for out in engine.step():
            if detok is None:
                continue
            text = detok.add(out.new_token_ids)
            if out.finished:
                text += detok.flush()
            sys.stdout.write(text)
            sys.stdout.flush()


def print_summary(req) -> None:
    """Token count, finish reason, decode speed and MTP acceptance of a streamed request."""
    t = req.timings()
    drafting = req.spec_stats
    accept = ""
    if drafting.num_draft_tokens:
        accept = (f", MTP acceptance {drafting.acceptance_rate:.2f}, "
                  f"{drafting.mean_acceptance_length:.2f} tokens/step")
    print(f"\n[{len(req.output_token_ids)} tokens, finish_reason={req.finish_reason}, "
          f"decode {t['decode_tokens_per_second']:.1f} tok/s{accept}]", file=sys.stderr)


def run(args) -> int:
    items = read_items(args)
    engine = engine_from_args(args)
    tok = engine.tokenizer
    requests = []
    for item in items:
        ids = encode_item(tok, item)
        requests.append((ids, sampling_params(args, item, engine.checkpoint.generation)))
    stream = not args.json and len(requests) == 1
    batches = [requests] if args.concurrent else [[r] for r in requests]
    count = 0
    for batch in batches:
        handles = []
        for ids, params in batch:
            handles.append(engine.add_request(f"cli-{count}", ids, params))
            count += 1
        detok = None
        if stream:
            detok = IncrementalDetokenizer(tok, handles[0].prompt_token_ids)
        stream_text(engine, detok)
        for req in handles:
            if args.json:
                print(json.dumps(result_json(req, tok), ensure_ascii=False), flush=True)
            elif stream:
                print_summary(req)
            else:
                print(tok.decode(req.output_token_ids), flush=True)
    return 0
