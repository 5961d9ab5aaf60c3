"""Single-stream greedy decode with MTP off, adaptive, and fixed k, side by side in one process.

    python bench/mtp_decode.py [--model default] [--mtp-head DIR] [--dtype float32] [--max-tokens 96]

Without ``--mtp-head`` a freshly initialized (untrained) head is used: its drafts are almost never
accepted, which shows what speculation costs when it does not pay and that the adaptive policy
backs off to about plain speed.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.train.head_init import save_new_head

PROMPT = "Write a Python function that sorts a list of dictionaries by a key."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--mtp-head", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    ck = load_checkpoint(args.model)
    head = args.mtp_head or save_new_head(tempfile.mkdtemp(), ck.config)
    tok = ck.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    dtype = getattr(torch, args.dtype)
    setups = {"MTP off": dict(spec_draft_n_max=0), "adaptive (k <= 3)": dict(mtp_head=head),
              **{f"k={k} fixed": dict(mtp_head=head, spec_draft_n_max=k, spec_adaptive=False) for k in (1, 2, 3)}}
    print(f"| {args.model}, {args.dtype} | decode tok/s | acceptance | tokens/step |\n|---|---|---|---|")
    for name, options in setups.items():
        engine = LLMEngine(ck, EngineConfig(dtype=dtype, **options))
        engine.generate([ids], params)  # warm up
        (req,) = engine.generate([ids], params)
        s = req.spec_stats
        print(f"| {name} | {req.timings()['decode_tokens_per_second']:.1f} | {s.acceptance_rate:.2f} | "
              f"{s.mean_acceptance_length:.2f} |")


if __name__ == "__main__":
    main()
