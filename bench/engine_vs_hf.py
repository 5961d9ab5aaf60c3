"""Single-stream decode and prompt-processing speed: mtpserve's engine vs HF transformers ``generate``.

Both run in this process on the same weights (the GGUF dequantized to float32 by each side's own
loader), alternating runs so machine noise hits both alike. Prints a Markdown table and writes JSON.

    python bench/engine_vs_hf.py [--model default] [--decode-tokens 128] [--prompt-tokens 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.loader.gguf import default_gguf_path
from mtpserve.engine.sampling_params import SamplingParams

CHATS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain why the sky is blue in three sentences.",
    "List five fruits as a JSON array.",
]


def load_hf(model: str):
    from transformers import AutoModelForCausalLM

    path = default_gguf_path() if model == "default" else model
    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ours_decode(engine: LLMEngine, ids: list[int], n: int) -> float:
    (req,) = engine.generate([ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return req.timings()["decode_tokens_per_second"]


def ours_prefill(engine: LLMEngine, ids: list[int]) -> float:
    (req,) = engine.generate([ids], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    return req.timings()["prompt_tokens_per_second"]


@torch.inference_mode()
def hf_generate_seconds(hf, ids: list[int], n: int) -> float:
    x = torch.tensor([ids])
    start = time.perf_counter()
    hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - start


def hf_decode(hf, ids: list[int], n: int) -> float:
    """Decode tok/s excluding the prompt: (n - 1) tokens over (time(n) - time(1))."""
    return (n - 1) / (hf_generate_seconds(hf, ids, n) - hf_generate_seconds(hf, ids, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="docs/bench_engine_vs_hf.json")
    args = ap.parse_args()

    engine = LLMEngine(load_checkpoint(args.model), EngineConfig())
    hf = load_hf(args.model)
    tok = engine.tokenizer
    chats = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False)
             for c in CHATS]
    long_text = " ".join(open(json.__file__.replace("__init__.py", "decoder.py")).read().split())
    long_ids = tok.encode(long_text, add_special_tokens=False)[: args.prompt_tokens]

    ours_dec, hf_dec, ours_pp, hf_pp = [], [], [], []
    for _ in range(args.repeats):
        for ids in chats:
            ours_dec.append(ours_decode(engine, ids, args.decode_tokens))
            hf_dec.append(hf_decode(hf, ids, args.decode_tokens))
        ours_pp.append(ours_prefill(engine, long_ids))
        hf_pp.append(len(long_ids) / hf_generate_seconds(hf, long_ids, 1))

    med = statistics.median
    result = {
        "model": args.model, "dtype": "float32", "threads": torch.get_num_threads(),
        "decode_tokens": args.decode_tokens, "prompt_tokens": len(long_ids),
        "decode_tok_s": {"mtpserve": med(ours_dec), "transformers": med(hf_dec)},
        "prompt_tok_s": {"mtpserve": med(ours_pp), "transformers": med(hf_pp)},
    }
    result["decode_speedup"] = result["decode_tok_s"]["mtpserve"] / result["decode_tok_s"]["transformers"]
    result["prompt_speedup"] = result["prompt_tok_s"]["mtpserve"] / result["prompt_tok_s"]["transformers"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"| | mtpserve | transformers | ratio |\n|---|---|---|---|\n"
          f"| decode tok/s (single stream, greedy, {args.decode_tokens} tokens) | "
          f"{result['decode_tok_s']['mtpserve']:.1f} | {result['decode_tok_s']['transformers']:.1f} | "
          f"{result['decode_speedup']:.2f}x |\n"
          f"| prompt tok/s ({len(long_ids)} tokens) | {result['prompt_tok_s']['mtpserve']:.0f} | "
          f"{result['prompt_tok_s']['transformers']:.0f} | {result['prompt_speedup']:.2f}x |")


if __name__ == "__main__":
    main()
