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
    src.add_argument("--prompts-file", help='JSONL: {"prompt": ...} or {"messages": [...]} per line, '
                                            "optionally with max_tokens, temperature, seed, ...")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per request on stdout")
    p.add_argument("--concurrent", action="store_true", help="run all requests of --prompts-file as one batch")


FILE_FIELDS = {"prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                "repetition_penalty", "presence_penalty", "frequency_penalty", "ignore_eos"}


def sampling_params(args, item: dict, defaults) -> SamplingParams:
    def pick(name, fallback):
        value = item.get(name, getattr(args, name, None))
        if value is None:
            value = getattr(defaults, name, None)
        return fallback if value is None else value

    return SamplingParams(
        max_tokens=pick("max_tokens", 128), temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
        top_k=pick("top_k", 0), min_p=pick("min_p", 0.0), seed=pick("seed", None),
        repetition_penalty=pick("repetition_penalty", 1.0), presence_penalty=pick("presence_penalty", 0.0),
        frequency_penalty=pick("frequency_penalty", 0.0), ignore_eos=bool(pick("ignore_eos", False)))


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


def run(args) -> int:
    if args.prompts_file:
        items = read_requests(args.prompts_file, FILE_FIELDS)
    elif args.chat is not None:
        items = [{"messages": [{"role": "user", "content": args.chat}]}]
    else:
        items = [{"prompt": args.prompt}]
    engine = engine_from_args(args)
    tok = engine.tokenizer
    requests = []
    for item in items:
        text = item["prompt"] if "prompt" in item else tok.apply_chat_template(item["messages"])
        ids = tok.encode(text, add_special_tokens="prompt" in item)
        requests.append((ids, sampling_params(args, item, engine.checkpoint.generation)))
    stream = not args.json and len(requests) == 1
    batches = [requests] if args.concurrent else [[r] for r in requests]
    count = 0
    for batch in batches:
        handles = []
        for ids, sp in batch:
            handles.append(engine.add_request(f"cli-{count}", ids, sp))
            count += 1
        detok = IncrementalDetokenizer(tok, handles[0].prompt_token_ids) if stream else None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if detok is not None:
                    sys.stdout.write(detok.add(out.new_token_ids) + (detok.flush() if out.finished else ""))
                    sys.stdout.flush()
        for req in handles:
            if args.json:
                print(json.dumps(result_json(req, tok), ensure_ascii=False), flush=True)
            elif stream:
                t = req.timings()
                spec = req.spec_stats
                accept = (f", MTP acceptance {spec.acceptance_rate:.2f}, {spec.mean_acceptance_length:.2f} tokens/step"
                          if spec.num_draft_tokens else "")
                print(f"\n[{len(req.output_token_ids)} tokens, finish_reason={req.finish_reason}, "
                      f"decode {t['decode_tokens_per_second']:.1f} tok/s{accept}]", file=sys.stderr)
            else:
                print(tok.decode(req.output_token_ids), flush=True)
    return 0
